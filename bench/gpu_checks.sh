#!/usr/bin/env bash
# Every check that needs a GPU, in one visit to a GPU machine: the GPU tests, then the benchmarks, each under its
# own time limit, results written under $OUT as they finish (a killed step loses only itself).
#
#   OUT=runs/gpu_checks bash bench/gpu_checks.sh [step ...]     # steps: tests sigmoid window train mfu (default all)
#
# On a machine without a package index, put the device kit's wheels (deepspeed, open_clip_torch, webdataset 0.2.x,
# simplejpeg, ...) in .whl/: they are installed into /tmp/site. Budget on one H100/H200: about 9 minutes.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-runs/gpu_checks}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ! "$PY" -c "import deepspeed, open_clip, simplejpeg" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.txt" 2>&1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS="${*:-tests sigmoid window train mfu}"

# step NAME SECONDS CMD...: runs CMD under a time limit, output to $OUT/NAME.txt, one status line to steps.txt
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) $name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

{
    date -u; git log -1 --format='commit %h %s' 2>/dev/null; git status --porcelain --untracked-files=no | head
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, triton, deepspeed, open_clip, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
