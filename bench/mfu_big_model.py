"""MFU and peak memory of a big CLIP on one GPU, beside what `python -m pipeline plan` predicted for it.

Run from the repository root on a GPU machine (about 2 minutes on an H200 once the shards exist):

    python bench/mfu_big_model.py            # ViT-H/14 (configs/clip/vit_h14.yaml): bench/results/mfu_vit_h14.md

What it does:
  1. reads the GPU's name and memory (torch.cuda.get_device_properties, in a child process, so that this process
     holds no CUDA context while the trainer runs) and plans the config on one GPU of that size with
     pipeline.plan: the setting plan recommends (`recommended:` in its output: the ZeRO stage, activation
     checkpointing on or off and the per-GPU micro-batch that it expects to run fastest for the config's global
     batch), and the memory it predicts at that micro-batch;
  2. renders (or reuses) the 224 px demo shards of bench/train_vs_open_clip.py (same defaults, same folder);
  3. trains the config with that micro-batch (train.grad_accum=1, plan's ZeRO stage and activation
     checkpointing, a log record every step) for --warmup-steps + --steps steps, and stops the trainer once
     the last step is logged (the loop would then write a 16 GB checkpoint);
  4. reports MFU over the timed steps (samples x FLOPs per pair / seconds / device peak, FLOPs by
     pipeline.models.clip.clip_step_flops, as plan and the trainer count them), the measured peak memory
     (max `peak_mem_gib` of metrics.jsonl: torch.cuda.max_memory_allocated) and the device memory in use
     (nvidia-smi, polled each second) beside plan's prediction, and the ratios.

With --device cpu the same steps run on the CPU for a check of the orchestration (give --gpu-mem-gb, a small
config and fp32, e.g. --config configs/demo/clip_tiny.yaml --set train.precision=fp32).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import train_vs_open_clip as tvo  # noqa: E402 - the shards, device probe, process handling and formatting

from train_vs_open_clip import REPO, BenchError, Interrupted  # noqa: E402

CONFIG = "configs/clip/vit_h14.yaml"
GiB = 2**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help=f"our run config (default {CONFIG})")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default), or cpu to check the orchestration without a GPU (needs --gpu-mem-gb)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for plan and trainer alike, e.g. train.zero_stage=1 (repeatable)")
    p.add_argument("--gpu-mem-gb", type=float, default=0.0,
                   help="GPU memory in GiB that plan assumes (default: the GPU's, from torch)")
    p.add_argument("--overhead-gb", type=float, default=4.0, help="plan's fixed per-GPU overhead (default 4)")
    p.add_argument("--batch-size", type=int, default=0, help="micro-batch to run instead of plan's (0: plan's)")
    p.add_argument("--batch-rule", choices=["recommended", "max"], default="recommended",
                   help="recommended: the setting plan recommends for the config's global batch: ZeRO stage, "
                        "activation checkpointing and micro-batch (default); max: the largest micro-batch that "
                        "fits at the config's stage and checkpointing (more memory, longer steps)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5; ViT-H/14 at plan's batch on an "
                   "H200 takes ~7 s per step at 40%% MFU)")
    p.add_argument("--workers", type=int, default=6,
                   help="loader workers (default 6: a ViT-H step is seconds long, and every worker holds "
                        "prefetched batches of thousands of images in shared memory)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak for MFU (default: the GPU's dense bf16 datasheet figure, "
                        "pipeline.train.device_peak.DEVICE_PEAK_TFLOPS)")
    p.add_argument("--oom-retry", type=float, default=0.75,
                   help="if the run runs out of memory, run once more at this fraction of the micro-batch "
                        "(default 0.75; 0: no retry); the report keeps both")
    p.add_argument("--timeout", type=int, default=170, help="seconds allowed per training run (default 170)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shards (default: bench/train_vs_open_clip.py's, runs/bench_shards_<size>px)")
    p.add_argument("--image-size", type=int, default=tvo.RENDER_IMAGE_SIZE)
    p.add_argument("--render-samples", type=int, default=tvo.RENDER_SAMPLES)
    p.add_argument("--render-parts", type=int, default=tvo.RENDER_PARTS)
    p.add_argument("--render-processes", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench" / "mfu_big_model",
                   help="run directory and log (default runs/bench/mfu_big_model)")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown report (default bench/results/mfu_<model>.md, e.g. mfu_vit_h14.md; '' to skip)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup_steps < 0 or a.workers < 0 or a.batch_size < 0 or a.timeout < 1:
        p.error("--steps and --timeout must be >= 1, --warmup-steps, --workers and --batch-size >= 0")
    if not 0 <= a.oom_retry < 1:
        p.error("--oom-retry must be in [0, 1)")
    if a.device == "cpu" and not a.gpu_mem_gb:
        p.error("--device cpu needs --gpu-mem-gb (there is no GPU to read it from)")
    if a.gpu_mem_gb < 0 or a.overhead_gb < 0 or a.peak_tflops < 0:
        p.error("--gpu-mem-gb, --overhead-gb and --peak-tflops must be >= 0")
    if a.data_dir is None:
        a.data_dir = REPO / "runs" / f"bench_shards_{a.image_size}px"
    a.data_dir, a.work_dir = a.data_dir.resolve(), a.work_dir.resolve()
    return a


# ---------------------------------------------------------------------------------------------- plan

def load(config: str, overrides: list[str]):
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise BenchError(str(e)) from None


def make_plan(a: argparse.Namespace, overrides: list[str], mem_gib: float, peak: float):
    from pipeline.config import ConfigError
    from pipeline.models.clip import ModelNameError
    from pipeline.plan import plan_run
    from pipeline.train.device_peak import PLAN_PEAK_TFLOPS

    try:
        return plan_run(load(a.config, overrides), 1, gpu_mem_gb=mem_gib, peak_tflops=peak or PLAN_PEAK_TFLOPS,
                        overhead_gb=a.overhead_gb)
    except (ConfigError, ModelNameError, ValueError) as e:
        raise BenchError(f"plan: {e}") from None


def choose_batch(a: argparse.Namespace, plan) -> tuple[int, str, list[str]]:
    """(micro-batch, how it was chosen, the overrides that setting needs) from plan on 1 GPU, per --batch-size /
    --batch-rule."""
    stage = plan.stages[plan.config_zero_stage]
    ckpt = plan.config_activation_checkpointing
    cap = stage.max_micro_batch_ckpt if ckpt else stage.max_micro_batch_full
    where = (f"ZeRO-{stage.stage} {'with' if ckpt else 'without'} activation checkpointing in "
             f"{plan.gpu_mem_bytes / GiB:.1f} GiB")
    if a.batch_size:
        return a.batch_size, f"--batch-size (plan's largest at {where}: {cap})", []
    if a.batch_rule == "max":
        if cap < 1:
            raise BenchError(f"plan: not even one sample fits at {where}; see python -m pipeline plan")
        return cap, f"the largest micro-batch plan fits at {where}", []
    rec = plan.recommendation
    if rec is None:
        raise BenchError(f"plan: nothing fits one GPU of {plan.gpu_mem_bytes / GiB:.1f} GiB; see python -m pipeline "
                         "plan")
    setting = [o for o in rec.overrides() if not o.startswith("train.grad_accum=")]  # the bench runs one micro-step
    return rec.micro_batch, (
        f"plan's recommendation for the config's global batch {plan.global_batch:,} on 1 GPU (the fastest setting "
        f"that fits, `recommended:` in plan's output): ZeRO-{rec.zero_stage}, activation checkpointing "
        f"{'on' if rec.activation_checkpointing else 'off'}, micro-batch {rec.micro_batch:,} x train.grad_accum="
        f"{rec.grad_accum}"), setting


def plan_command(a: argparse.Namespace, mem_gib: float, peak: float, extra: list[str]) -> list[str]:
    cmd = ["python", "-m", "pipeline", "plan", "--config", a.config, "--gpus", "1", "--gpu-mem-gb", f"{mem_gib:g}"]
    if a.overhead_gb != 4.0:
        cmd += ["--overhead-gb", f"{a.overhead_gb:g}"]
    from pipeline.train.device_peak import PLAN_PEAK_TFLOPS

    if peak and peak != PLAN_PEAK_TFLOPS:  # plan's default
        cmd += ["--peak-tflops", f"{peak:g}"]
    return cmd + a.overrides + extra


# ---------------------------------------------------------------------------------------------- run

class SmiPoller:
    """Max of nvidia-smi's memory.used (MiB) on GPU 0, polled every second in a thread; None without nvidia-smi.
    It sees what the process holds on the device (CUDA context, allocator cache), which plan's total (overhead
    included) predicts and torch.cuda.max_memory_allocated does not show."""

    def __init__(self):
        self.max_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if shutil.which("nvidia-smi") else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                used = float(out.strip().splitlines()[0])
                self.max_mib = used if self.max_mib is None else max(self.max_mib, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(1.0)

    def __enter__(self) -> "SmiPoller":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)


@dataclasses.dataclass
class Attempt:
    batch: int
    command: list[str]
    log: Path
    plan: object  # pipeline.plan.Plan at this micro-batch
    samples_per_s: list[float] = dataclasses.field(default_factory=list)  # timed steps
    trainer_mfu: list[float] = dataclasses.field(default_factory=list)
    peak_mem_gib: float | None = None
    smi_max_gib: float | None = None
    wall_s: float = 0.0
    first_record_s: float | None = None  # start-up: process start to the first logged step
    error: str = ""
    oom: bool = False


def train_command(a: argparse.Namespace, pattern: str, out_dir: Path, batch: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--config", a.config, *a.overrides,
            f"data.train={pattern}", "data.val=", "data.classes=", f"data.workers={a.workers}",
            f"train.out_dir={out_dir}", f"train.steps={a.warmup_steps + a.steps}",
            f"train.global_batch_size={batch}", f"train.batch_size={batch}", "train.grad_accum=1",
            "train.log_every=1", "train.ckpt_every=0", "train.progress=false", "train.eval_at_end=false",
            "train.resume=none"]


def run_attempt(a: argparse.Namespace, pattern: str, batch: int, plan, env: dict) -> Attempt:
    tag = f"b{batch}"
    out_dir = a.work_dir / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    att = Attempt(batch, train_command(a, pattern, out_dir, batch), a.work_dir / f"{tag}.log", plan)
    run = tvo.Run(f"{Path(a.config).stem} micro-batch {batch}", 1, att.command, att.log)
    metrics = out_dir / "metrics.jsonl"
    total = a.warmup_steps + a.steps
    start = time.perf_counter()
    first = {}

    def finished() -> bool:  # also notes when the first step was logged (start-up time)
        if "t" not in first and metrics.is_file() and metrics.stat().st_size:
            first["t"] = time.perf_counter() - start
        return tvo._has_step(metrics, total)

    with SmiPoller() as smi:
        try:
            tvo.execute(run, env, a.timeout, finished)
        except BenchError as e:
            att.error = str(e)
            text = att.log.read_text(errors="replace") if att.log.is_file() else ""
            att.oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        finally:  # a checkpoint begun before the stop is partial and large (16 GB for ViT-H/14): not a result
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    att.wall_s, att.first_record_s = run.wall_s or time.perf_counter() - start, first.get("t")
    att.smi_max_gib = smi.max_mib * 2**20 / GiB if smi.max_mib is not None else None
    records = tvo.read_records(metrics) if metrics.is_file() else []
    for r in records:
        if r.get("step", 0) > a.warmup_steps and "samples_per_s" in r:
            att.samples_per_s.append(r["samples_per_s"])
            if isinstance(r.get("mfu"), (int, float)):
                att.trainer_mfu.append(r["mfu"])
    peaks = [r["peak_mem_gib"] for r in records if isinstance(r.get("peak_mem_gib"), (int, float))]
    att.peak_mem_gib = max(peaks) if peaks else None
    if not att.error and len(att.samples_per_s) != a.steps:
        att.error = f"found {len(att.samples_per_s)} timed steps in {metrics}, expected {a.steps}"
    return att


def throughput(att: Attempt) -> float | None:
    """Samples/s over all timed steps together (total samples / total time: the harmonic mean of the steps)."""
    if not att.samples_per_s:
        return None
    return len(att.samples_per_s) / sum(1 / s for s in att.samples_per_s)


# ---------------------------------------------------------------------------------------------- report

def _g(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def attempt_rows(att: Attempt, flops: float, peak: float) -> list[list[str]]:
    p = att.plan
    stage = p.stages[p.config_zero_stage]
    predicted = stage.total_ckpt if p.config_activation_checkpointing else stage.total_full
    predicted_alloc = predicted - p.overhead_bytes
    sps = throughput(att)
    mfu = sps * flops / (peak * 1e12) if sps and peak else None
    rows = [
        ["micro-batch per GPU", f"{att.batch:,}", ""],
        ["samples/s (timed steps)", _g(sps, ",.1f"),
         f"{len(att.samples_per_s)} steps; per step {min(att.samples_per_s):,.1f} - {max(att.samples_per_s):,.1f}"
         if att.samples_per_s else ""],
        ["step time (s)", _g(att.batch / sps if sps else None, ".2f"),
         f"plan at {p.mfu:.0%} MFU of {p.peak_tflops:g} TFLOP/s: {p.step_time_s:.2f} s"],
        ["MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
         f"trainer's own (median): {100 * sorted(att.trainer_mfu)[len(att.trainer_mfu) // 2]:.1f}%"
         if att.trainer_mfu else ""],
        ["peak memory allocated (GiB)", _g(att.peak_mem_gib),
         f"plan without its {p.overhead_bytes / GiB:g} GiB overhead: {predicted_alloc / GiB:.2f}; ratio measured / "
         f"plan {att.peak_mem_gib / (predicted_alloc / GiB):.2f}" if att.peak_mem_gib is not None
         else f"plan without its {p.overhead_bytes / GiB:g} GiB overhead: {predicted_alloc / GiB:.2f}"],
        ["device memory in use, max (GiB, nvidia-smi)", _g(att.smi_max_gib),
         f"plan's total: {predicted / GiB:.2f}" + (f"; ratio measured / plan {att.smi_max_gib / (predicted / GiB):.2f}"
                                                    if att.smi_max_gib is not None else "")],
        ["start-up to the first logged step (s)", _g(att.first_record_s, ".0f"), f"whole run {att.wall_s:.0f} s"],
    ]
    return rows


def write_report(path: Path, a: argparse.Namespace, argv: list[str], ctx: dict, attempts: list[Attempt]) -> None:
    p0 = ctx["plan"]
    stage = p0.stages[p0.config_zero_stage]
    info = ctx["info"]
    sections = []
    for att in attempts:
        p = att.plan
        st = p.stages[p.config_zero_stage]
        status = f"**Run failed:** {tvo.relative(att.error)}\n\n" if att.error else ""
        sections.append(f"""### Micro-batch {att.batch:,}{" (after running out of memory at a larger one)" if att is not attempts[0] else ""}

{status}{tvo.format_markdown(["", "measured", "plan / note"], attempt_rows(att, ctx['flops'], ctx['peak']))}

Plan at this micro-batch (`{shlex.join(plan_command(a, ctx['mem_gib'], ctx['peak'], [f"train.global_batch_size={att.batch}", "train.grad_accum=1"]))}`), ZeRO-{st.stage}: parameters {st.params / GiB:.2f} + gradients {st.grads / GiB:.2f} + optimizer {st.optimizer / GiB:.2f} GiB = states {st.states / GiB:.2f} GiB; activations {(p.act_batch_ckpt if p.config_activation_checkpointing else p.act_batch_full) / GiB:.2f} GiB ({(p.act_per_sample_ckpt if p.config_activation_checkpointing else p.act_per_sample_full) / 2**20:.1f} MiB per sample, {"with" if p.config_activation_checkpointing else "without"} activation checkpointing, batch and loss included); overhead {p.overhead_bytes / GiB:g} GiB; total {(st.total_ckpt if p.config_activation_checkpointing else st.total_full) / GiB:.2f} GiB.

Command:

    {tvo.display_command(att.command)}

""")
    peak_text = (f"{ctx['peak']:g} TFLOP/s ({ctx['peak_source']})" if ctx["peak"]
                 else "none known for this device (--peak-tflops sets one): no MFU")
    text = f"""# MFU and memory of {p0.model} on one GPU, against `python -m pipeline plan`

Rerun from the repository root on a GPU machine:

    {shlex.join(["python", "bench/mfu_big_model.py", *argv])}

(This time: {(time.perf_counter() - ctx['started']) / 60:.1f} minutes end to end.)

## What was run

- Device: {ctx['device']}; {info['cores']} CPU cores ({info['cpu']})
- Date: {info['date']}; git commit {info['commit']}
- Python {info['python']}; torch {tvo._dist_version('torch')}, triton {tvo._dist_version('triton')}, deepspeed {tvo._dist_version('deepspeed')}, open_clip_torch {tvo._dist_version('open_clip_torch')}
- Config `{a.config}`{(" with `" + " ".join(a.overrides) + "`") if a.overrides else ""}: {p0.model}, {p0.params:,} parameters, {p0.precision}, ZeRO-{p0.config_zero_stage}, activation checkpointing {"on" if p0.config_activation_checkpointing else "off"}
- Optimizer step on one {a.device.upper()} device: {tvo.ours_step(a.config, a.overrides, a.device)}
- Micro-batch: {ctx['batch_why']}. Plan on 1 GPU of {ctx['mem_gib']:.1f} GiB (`{shlex.join(plan_command(a, ctx['mem_gib'], ctx['peak'], []))}`): at the config's ZeRO-{stage.stage}, the largest micro-batch is {stage.max_micro_batch_ckpt:,} with activation checkpointing and {stage.max_micro_batch_full:,} without
- Data: `{tvo.relative(ctx['shards']['pattern'])}` ({ctx['shards']['samples']:,} rendered demo images at {ctx['shards']['settings']['image_size']} px, the shards of bench/train_vs_open_clip.py); loader workers: {a.workers}
- {a.warmup_steps} warm-up + {a.steps} timed steps, train.grad_accum=1, a metrics record per step; the trainer is stopped once the last step is logged (no final checkpoint)
- FLOPs per image-text pair: {ctx['flops'] / 1e9:,.1f} GFLOP forward + backward (`pipeline.models.clip.clip_step_flops`, as plan and the trainer count: each tower's forward counted by torch's FlopCounterMode on the meta device, x3 for forward + backward, pipeline/train/flops.py; the forward recomputed by activation checkpointing is not counted, so it is part of what MFU absorbs). Peak: {peak_text}

## Result

{"".join(sections)}
## How to read it

- MFU = samples/s over the timed steps (all timed samples / their total time, data waits included) x FLOPs per pair / peak.
- "peak memory allocated": the largest `peak_mem_gib` in metrics.jsonl (`torch.cuda.max_memory_allocated`, tensors only). Plan's total includes a fixed {a.overhead_gb:g} GiB for the CUDA context, communication buffers and allocator slack, which that counter does not see, so it is compared with plan's total less that overhead. "device memory in use" (nvidia-smi, all of the device's processes: the trainer's only here) is what the fixed overhead is meant to cover, and is compared with plan's total.
- What plan leaves out (pipeline/plan.py): the activations of the embeddings, final norms and pooling heads, and under ZeRO on several GPUs DeepSpeed's own buffers (gradient buckets, the fp32 gradient partition).
"""
    from pipeline.atomic_write import write_atomic  # importable: train_vs_open_clip put the repository on sys.path

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)  # a kill while writing leaves the previous complete report


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, tvo._on_signal)
    started = time.perf_counter()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    shards = tvo.render_shards(a.data_dir, a.render_samples, a.render_parts, a.image_size, a.render_processes)
    env = tvo.child_env(0)
    env["PYTHONUNBUFFERED"] = "1"
    peak, source = a.peak_tflops, "--peak-tflops" if a.peak_tflops else ""
    if a.device == "cuda":
        dev = tvo.cuda_device_info(env)
        mem_gib = a.gpu_mem_gb or dev["total_memory"] / GiB
        device = f"{dev['name']} ({dev['total_memory'] / GiB:.1f} GiB, `torch.cuda.get_device_properties`)"
        if not peak:
            peak, source = tvo.datasheet_peak(dev["name"])
    else:
        mem_gib, device = a.gpu_mem_gb, "CPU (no GPU: an orchestration check; memory figures are n/a)"
    plan = make_plan(a, a.overrides, mem_gib, peak)
    batch, why, setting = choose_batch(a, plan)
    if setting:  # plan's recommended stage and checkpointing: the runs, plan at their batch and the report use them
        a.overrides = a.overrides + setting
        plan = make_plan(a, a.overrides, mem_gib, peak)
    flops = plan.flops_per_sample
    print(f"{plan.model} on {device}: plan on 1 GPU of {mem_gib:.1f} GiB -> micro-batch {batch:,} ({why}); "
          f"{flops / 1e9:,.1f} GFLOP per pair; peak {peak:g} TFLOP/s", flush=True)
    ctx = {"plan": plan, "info": tvo.machine_info(), "device": device, "mem_gib": mem_gib, "peak": peak,
           "peak_source": source, "flops": flops, "shards": shards, "batch_why": why, "started": started}
    # named after the config (configs/clip/vit_h14.yaml -> mfu_vit_h14.md), as the configs name the models
    report = a.results if a.results is not None else REPO / "bench" / "results" / f"mfu_{Path(a.config).stem}.md"
    report = report if str(report) not in ("", ".") else None
    attempts: list[Attempt] = []
    try:
        while True:
            at_batch = make_plan(a, a.overrides + [f"train.global_batch_size={batch}", "train.grad_accum=1"],
                                 mem_gib, peak)
            print(f"training micro-batch {batch:,} for {a.warmup_steps} + {a.steps} steps ...", end=" ", flush=True)
            att = run_attempt(a, shards["pattern"], batch, at_batch, env)
            attempts.append(att)
            sps = throughput(att)
            mfu = sps * flops / (peak * 1e12) if sps and peak else None
            st = at_batch.stages[at_batch.config_zero_stage]
            predicted = (st.total_ckpt if at_batch.config_activation_checkpointing else st.total_full) / GiB
            print(f"{_g(sps, ',.1f')} samples/s, MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}, peak "
                  f"allocated {_g(att.peak_mem_gib)} GiB (plan {predicted - a.overhead_gb:.2f} without overhead), "
                  f"device max {_g(att.smi_max_gib)} GiB (plan {predicted:.2f}), {att.wall_s:.0f}s"
                  + (f" [{att.error}]" if att.error else ""), flush=True)
            if report:
                write_report(report, a, argv, ctx, attempts)
            if att.oom and a.oom_retry and len(attempts) == 1 and batch > 1:
                batch = max(1, math.floor(batch * a.oom_retry))
                print(f"out of memory: once more at micro-batch {batch:,}", flush=True)
                continue
            break
    except Interrupted as e:
        print(f"\n{e}; the report keeps the {len(attempts)} finished run(s)", file=sys.stderr, flush=True)
        return 124
    if report:
        print(f"report written to {report}")
    return 1 if attempts[-1].error else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
