#!/usr/bin/env bash
# Submit a cdfkd distillation to a running Ray cluster as a Ray job.
#
#   deploy/ray/submit.sh DASHBOARD_URL RUN_TOML OUT_DIR [more `cdfkd train` flags]
#
# DASHBOARD_URL is the cluster's job server, e.g. http://127.0.0.1:8265. The folder holding
# RUN_TOML is uploaded as the job's working directory, so paths in it must be relative to that
# folder (TLS files beside the config) or absolute on the cluster's nodes. OUT_DIR must be a
# path the Ray worker can write (shared storage on a multi-node cluster). Every node needs cdfkd
# installed (./install.sh). The job's `cdfkd train` finds the cluster through RAY_ADDRESS,
# which Ray sets for job entrypoints.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
dashboard=$1
config=$2
out=$3
shift 3
workdir=$(cd "$(dirname "$config")" && pwd)
exec ray job submit --address "$dashboard" --working-dir "$workdir" -- \
    cdfkd train --config "$(basename "$config")" --out "$out" "$@"
