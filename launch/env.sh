#!/usr/bin/env bash
# Source this file: creates (or reuses) .venv at the repository root and installs the project into it.
# Re-installs only when pyproject.toml changed since the last install (a stamp file records its hash).
# PIPELINE_TORCH overrides the torch/torchvision pins installed when the venv has no torch yet
# (on a GPU cluster, point it at the build that matches your CUDA driver).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIPELINE_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "[env] installing torch"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ${PIPELINE_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
STAMP="$VENV/.pipeline-install-stamp"
WANT="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[env] installing the project and its dependencies"
    "$VENV/bin/python" -m pip install -q -e "$REPO[test]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$REPO"
