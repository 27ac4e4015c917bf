#!/usr/bin/env bash
# Installs what is missing for cdfkd on a Debian machine with Python >= 3.11 (run as root).
# Idempotent: a second run changes nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")"

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }
fi

# One resolve for every Python dependency (torch==2.13.0 takes the CPU wheel; see pyproject.toml).
stamp=".install-stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! python -c "import cdfkd.coordinator.cli" 2>/dev/null; then
    python -m pip install --disable-pip-version-check -q -e '.[dev]'
    touch "$stamp"
fi
