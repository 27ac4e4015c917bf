#!/usr/bin/env bash
# Submit a cdfkd distillation to a running Ray cluster as a Ray job.
#
#   deploy/ray/submit.sh DASHBOARD_URL RUN_TOML OUT_DIR [more `cdfkd train` flags]
#
# DASHBOARD_URL is the cluster's job server, e.g. http://HEAD_IP:8265. The cluster runs with
# token authentication (deploy/ray/README.md): this script sets RAY_AUTH_MODE=token, and
# `ray job submit` sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
# The folder holding RUN_TOML is uploaded as the job's working directory EXCEPT private keys:
# every file holding a PEM "PRIVATE KEY" block, and every *.key, *.p12, *.pfx, is left out (and
# named on stderr). Keys the run needs (the student's client key for the teacher nodes) must be
# on the cluster's nodes already, named in RUN_TOML by absolute paths. Other paths in RUN_TOML
# are relative to its folder or absolute on the cluster's nodes. OUT_DIR must be a path the Ray
# worker can write (shared storage on a multi-node cluster). Every node needs cdfkd installed
# (./install.sh). The job's `cdfkd train` finds the cluster through RAY_ADDRESS, which Ray sets
# for job entrypoints. CDFKD_SUBMIT_DRY_RUN=1 prints the runtime environment and submits nothing.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
dashboard=$1
config=$2
out=$3
shift 3
workdir=$(cd "$(dirname "$config")" && pwd)
runtime_env=$(python3 - "$workdir" <<'PYTHON'
"""The runtime environment: the working directory with every private key excluded."""
import json
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
KEY_SUFFIXES = (".key", ".p12", ".pfx")
excludes = [f"*{suffix}" for suffix in KEY_SUFFIXES]
for path in sorted(root.rglob("*")):
    if not path.is_file():
        continue
    relative = path.relative_to(root).as_posix()
    secret = path.suffix.lower() in KEY_SUFFIXES
    if not secret:
        try:
            with path.open("rb") as handle:
                secret = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", handle.read(1 << 20))
        except OSError:
            continue
    if secret:
        print(f"submit.sh: not uploading {relative} (a private key)", file=sys.stderr)
        excludes.append("/" + re.sub(r"([\\\[\]*?!# ])", r"\\\1", relative))
print(json.dumps({"working_dir": str(root), "excludes": excludes}))
PYTHON
)
if [ "${CDFKD_SUBMIT_DRY_RUN:-0}" = 1 ]; then
    printf '%s\n' "$runtime_env"
    exit 0
fi
export RAY_AUTH_MODE=token
exec ray job submit --address "$dashboard" --runtime-env-json "$runtime_env" -- \
    cdfkd train --config "$(basename "$config")" --out "$out" "$@"
