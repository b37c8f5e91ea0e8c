#!/usr/bin/env bash
# Creates .venv and installs mlaserve into it; reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.mlaserve-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch first and exactly pinned, so that pip takes the CPU build already on the machine
    # instead of resolving a CUDA build with gigabytes of dependencies.
    .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
    .venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
    .venv/bin/python -c "import torch, engine, triton" || { echo "install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
