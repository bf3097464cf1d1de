"""Runs open_clip_train.main with our model configs (configs/model/*.json, e.g. clip-tiny) registered.

Used by bench/train_vs_open_clip.py (with a python whose webdataset is 0.2.x):
    python bench/open_clip_train_entry.py --model clip-tiny --train-data ... [open_clip_train flags]

Besides open_clip_train's own output it prints, on exit, two lines for the benchmark to parse:
  BENCH_STEP_END_TIMES [t1, t2, ...]  time.perf_counter() at the end of each optimizer step, because
      open_clip_train's `Batch (t)` is printed to 1 ms, which is ~3% of a ViT-B/16 step on an H100-class GPU;
      the benchmark times the same windows (between two log steps) from these instead.
  BENCH_PEAK_MEM_BYTES n  torch.cuda.max_memory_allocated(), only when CUDA was used (the same measure our
      trainer logs as peak_mem_gib).
Neither changes what open_clip_train computes: a post-step hook reads a clock, and the exit hook reads a counter.
"""
import atexit
import json
import sys
import time
from pathlib import Path

import open_clip
import torch
from open_clip_train.main import main
from torch.optim.optimizer import register_optimizer_step_post_hook

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

_step_end_times: list[float] = []


def _record_step_end(optimizer, args, kwargs) -> None:
    # Called after every optimizer.step() in the process (open_clip_train has one optimizer). No GPU sync: the
    # benchmark only uses differences between log steps, where open_clip_train itself syncs (loss.item()).
    _step_end_times.append(time.perf_counter())


def _report_at_exit() -> None:
    print("BENCH_STEP_END_TIMES " + json.dumps([round(t, 6) for t in _step_end_times]), flush=True)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"BENCH_PEAK_MEM_BYTES {torch.cuda.max_memory_allocated()}", flush=True)


if __name__ == "__main__":
    open_clip.add_model_config(str(MODEL_CONFIG_DIR))
    register_optimizer_step_post_hook(_record_step_end)
    atexit.register(_report_at_exit)
    sys.exit(main(sys.argv[1:]))
