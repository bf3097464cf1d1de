#!/usr/bin/env bash
# Every check that needs a GPU, in one visit to a GPU machine: the GPU tests, then the benchmarks, each under its
# own time limit. Every output goes to $WORK; after each step all of it is packed again into $OUT/results.tgz
# (one file: a device session returns only a few files), so a killed step loses only itself.
#
#   OUT=runs/gpu_out bash bench/gpu_checks.sh [step ...]     # steps: tests sigmoid window train mfu (default all)
#
# On a machine without a package index, put the device kit's wheels (deepspeed, open_clip_torch, webdataset 0.2.x,
# simplejpeg, ...) in .whl/, and timm >= 1.0.31 (pipeline/models/swinv2.py needs it; a machine seen with 1.0.29:
# `pip download --no-deps timm==1.0.31 -d .whl`): they are installed into /tmp/site. Budget on one H100/H200:
# about 9 minutes.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-runs/gpu_out}"
WORK="${WORK:-runs/gpu_checks}"
mkdir -p "$OUT" "$WORK"
FINAL_OUT="$OUT"
OUT="$WORK"  # the steps write here; pack() copies it to $FINAL_OUT/results.tgz
PY="${PYTHON:-python3}"
if [ -d .whl ] && ! "$PY" -c "import deepspeed, open_clip, simplejpeg" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.txt" 2>&1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS="${*:-tests sigmoid window train mfu}"

pack() {  # steps in parallel pack at once: each through its own temporary name, then an atomic rename
    local tmp="$FINAL_OUT/.results-$BASHPID.tgz"
    tar czf "$tmp" -C "$WORK" . 2>/dev/null && mv "$tmp" "$FINAL_OUT/results.tgz"
    cp "$WORK/steps.txt" "$FINAL_OUT/steps.txt" 2>/dev/null
}

# step NAME SECONDS CMD...: runs CMD under a time limit, output to $OUT/NAME.txt, one status line to steps.txt
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) $name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
    pack
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

{
    date -u; git log -1 --format='commit %h %s' 2>/dev/null; git status --porcelain --untracked-files=no | head
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, triton, deepspeed, open_clip, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
df -h /dev/shm | tail -1 >> "$OUT/machine.txt"

if want train || want mfu; then  # the 224 px shards both training benchmarks read, rendered while the tests run
    step shards 150 "$PY" bench/train_vs_open_clip.py --device cuda --render-only &
fi
if want tests; then  # correctness first, in parallel (timing is the benchmarks' business)
    SYNC=tests/train/test_sync_free.py::test_steps_between_log_steps_do_not_synchronise
    step tests_kernels 170 "$PY" -m pytest tests/kernels -q -rfE -p no:cacheprovider &
    step tests_models 170 "$PY" -m pytest tests/models -q -rfE -p no:cacheprovider &
    step tests_sync_a 170 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/train/test_engine.py \
        tests/train/test_sync_free.py::test_sync_debug_mode_turns_a_read_back_into_an_error \
        "$SYNC[clip]" "$SYNC[siglip]" "$SYNC[imagebind]" &
    step tests_sync_b 170 "$PY" -m pytest -q -rfE -p no:cacheprovider "$SYNC[clip_swinv2]" "$SYNC[simmim]" \
        "$SYNC[clip_lit_ema]" &
    step tests_sync_c 170 "$PY" -m pytest -q -rfE -p no:cacheprovider "$SYNC[supervised]" "$SYNC[supervised_mixup]" &
fi
wait
if want sigmoid; then
    step sigmoid 100 "$PY" bench/sigmoid_loss_bench.py --device cuda --out "$OUT/sigmoid_rows.jsonl"
fi
if want window; then
    step window "${WINDOW_LIMIT:-200}" "$PY" bench/window_attention_bench.py --budget-s "${WINDOW_BUDGET:-100}" \
        --out "$OUT/window_attention.md"
fi
if want train; then  # ViT-B/16 bf16 batch 256: ours vs open_clip_train (TRAIN_VARIANTS picks the runs)
    step train "${TRAIN_LIMIT:-420}" "$PY" bench/train_vs_open_clip.py --device cuda --steps "${TRAIN_STEPS:-50}" \
        --warmup-steps 20 --variants "${TRAIN_VARIANTS:-ours,open_clip,open_clip+compile,ours+compile}" \
        --results "$OUT/train_vs_open_clip_gpu.md"
fi
if want mfu; then  # ViT-H/14 at the micro-batch plan recommends for one GPU: MFU, measured vs predicted memory
    step mfu "${MFU_LIMIT:-200}" "$PY" bench/mfu_big_model.py --warmup-steps 1 --steps "${MFU_STEPS:-4}" \
        --results "$OUT/mfu_vit_h14.md"
fi
tar czf "$OUT/bench_runs.tgz" --exclude=checkpoints --exclude='*.tar' runs/bench 2>/dev/null
pack
cat "$OUT/steps.txt"
