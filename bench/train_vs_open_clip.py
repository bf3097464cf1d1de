"""Training throughput (samples/s) of our trainer vs open_clip_train, same shards / model / batch / precision.

Two suites, run from the repository root:

    .venv/bin/python bench/train_vs_open_clip.py                 # --suite cpu: bench/results/train_vs_open_clip.md
    python bench/train_vs_open_clip.py --device cuda              # --suite gpu: bench/results/train_vs_open_clip_gpu.md

--suite cpu (the default without --device cuda; about 7 minutes on 2 CPU cores once the shards and the
environment exist):
  1. writes (or reuses) the demo shards with pipeline.demo_data.shapes (20 tar shards, 20000 samples);
  2. creates (or reuses) a separate virtual environment for open_clip_train: the same torch, torchvision,
     open_clip_torch and image/tokenizer stack as ours, plus webdataset 0.2.x, which open_clip_train needs
     (our environment has webdataset 1.x);
  3. trains clip-tiny with each system for the same number of steps, 1 process on the CPU, batch 64, fp32,
     1 loader worker, the same OMP_NUM_THREADS; runs alternate ABBA-style when --repeats > 1; a run starts
     when other processes leave the CPU alone and is made again if they took more than 10% of it meanwhile;
  4. takes each system's throughput over 10-step windows after the warm-up steps, prints the medians and
     their ratio, and writes bench/results/train_vs_open_clip.md.

--suite gpu (the default with --device cuda; about 4-5 minutes on one H200 with 16 CPU cores, shard rendering
included):
  1. renders (or reuses) 224 px demo shards in parallel (--render-samples, default 12288, in --render-parts
     folders written by one process each; the union is one braceexpand pattern both trainers read);
  2. runs open_clip_train with this interpreter (no virtual environment: its webdataset must be 0.2.x, e.g.
     from PYTHONPATH; --open-clip-python venv restores the CPU suite's separate environment);
  3. trains ViT-B-16 in bf16 (ours: train.precision=bf16; open_clip_train: --precision amp_bf16), global batch
     256, one GPU, 12 loader workers each, back to back: ours, open_clip_train, open_clip_train --torchcompile,
     ours with train.compile=true (--variants), each under its own --timeout;
  4. reports per variant the median samples/s over 10-step windows after the warm-up, the spread of the
     windows (min / p10 / p90 / max), MFU by one FLOP count for both (pipeline.models.clip.clip_step_flops,
     the trainer's and plan's, against the device's dense bf16 peak of pipeline.train.device_peak), peak GPU memory (torch.cuda.max_memory_allocated on both sides) and
     wall time. The report is rewritten after every run, so a later timeout loses no finished run.
  `--render-only` writes the shards and exits (bench/mfu_big_model.py reads the same ones).

Timing: each system's own per-window numbers are used. Ours: `samples_per_s` of metrics.jsonl (wall time of
a window of steps, data waits included). open_clip_train: batch / `Batch (t)` of its log lines, where
`Batch (t)` is the mean time per step since its previous log line, data waits included; in the GPU suite the
same windows are timed from bench/open_clip_train_entry.py's step-end clock instead (`Batch (t)` is printed to
1 ms). open_clip_train also logs after its first step, so it runs one step more and skips one step more,
giving the same number of windows.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(REPO) not in sys.path:  # this checkout's pipeline package, not whichever one is installed (or none)
    sys.path.insert(0, str(REPO))
CONFIG = "configs/demo/clip_tiny.yaml"
MODEL = "clip-tiny"
LOG_EVERY = 10  # steps per timing window, both systems
LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP, SEED = 1e-3, 50, 0.1, (0.9, 0.98), 1e-6, 1.0, 0
OURS, OPEN_CLIP = "ours (pipeline)", "open_clip_train"

# The GPU suite: the production ViT-B/16 config (ZeRO stage, betas, ...) with the batch, data and schedule of
# the comparison put on top, so that both trainers do the same work.
GPU_CONFIG = "configs/clip/vit_b16.yaml"
GPU_MODEL = "ViT-B-16"
# variant name -> (system, compiled)
VARIANTS = {"ours": (OURS, False), "open_clip": (OPEN_CLIP, False), "open_clip+compile": (OPEN_CLIP, True),
            "ours+compile": (OURS, True)}
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}  # ours -> open_clip_train's flag
SUITE_DEFAULTS = {
    "cpu": dict(device="cpu", model=MODEL, config=CONFIG, precision="fp32", batch_size=64, workers=1, steps=80,
                warmup_steps=10, log_every=LOG_EVERY, repeats=3, threads=2, variants="ours,open_clip",
                open_clip_python="venv", timeout=900, retries=3, wait_idle=600,
                data_dir=REPO / "runs" / "bench_data", results=BENCH / "results" / "train_vs_open_clip.md"),
    # 20 + 80 steps of ViT-B/16 at batch 256 are a few seconds of GPU time per run (unless a loader cannot keep
    # up): start-up and compilation dominate, so 8 timed windows (a spread worth quoting) cost almost nothing.
    "gpu": dict(device="cuda", model=GPU_MODEL, config=GPU_CONFIG, precision="bf16", batch_size=256, workers=12,
                steps=80, warmup_steps=20, log_every=LOG_EVERY, repeats=1, threads=0,
                variants="ours,open_clip,open_clip+compile,ours+compile", open_clip_python="current", timeout=240,
                retries=0, wait_idle=0, data_dir=None,  # data_dir: runs/bench_shards_<size>px
                results=BENCH / "results" / "train_vs_open_clip_gpu.md"),
}
RENDER_SAMPLES, RENDER_PARTS, RENDER_SHARD_SAMPLES, RENDER_IMAGE_SIZE = 12288, 16, 256, 224
RENDER_MANIFEST = "bench_shards.json"

# open_clip_train's data.py stops with KeyError 'fname' on webdataset >= 0.2.96 (an end-of-shard marker it
# does not expect); 0.2.86 is the newest release before that marker.
WEBDATASET_SPEC = "webdataset>=0.2.5,<0.2.96"
WEBDATASET_MAX = (0, 2, 96)
# Installed in the open_clip_train environment at exactly the versions our environment has, so that model,
# image decoding, transforms and tokenizer are the same code on both sides.
PINNED_FROM_OURS = ["torch", "torchvision", "open_clip_torch", "timm", "numpy", "pillow", "ftfy", "regex",
                    "safetensors", "huggingface_hub", "tqdm", "braceexpand", "fsspec"]
EXTRA = ["pandas"]  # imported by open_clip_train.data
REQUIREMENTS_STAMP = "bench-requirements.txt"

IDLE_BUSY = 0.1  # machine CPU share used by others below which a run may start

OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")
STEP_TIMES_LINE = re.compile(r"^BENCH_STEP_END_TIMES (\[.*\])\s*$", re.M)  # bench/open_clip_train_entry.py
PEAK_MEM_LINE = re.compile(r"^BENCH_PEAK_MEM_BYTES (\d+)\s*$", re.M)


class BenchError(Exception):
    """Stops the benchmark; the message is printed as one line."""


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`) or SIGINT: the running child is killed, finished runs are kept."""


@dataclass
class Run:
    system: str
    repeat: int
    command: list[str]
    log: Path
    compiled: bool = False
    wall_s: float = 0.0
    samples_per_s: list[float] = field(default_factory=list)  # per timed window
    data_wait_frac: list[float] = field(default_factory=list)  # per timed window
    other_cpu: float = float("nan")  # share of the machine's CPU used by other processes during the run
    attempts: int = 1  # runs made for this one (disturbed runs are made again, see --retries)
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated over the run, GiB
    step_time_ms: list[float] = field(default_factory=list)  # ours: the trainer's step_time_ms per timed window
    trainer_mfu: list[float] = field(default_factory=list)  # ours: the trainer's own mfu per timed window
    timing: str = ""  # where the window times come from
    error: str = ""  # GPU suite: why the run gave no result (the suite goes on with the next run)
    stopped_after_last_window: bool = False  # ours, GPU suite: killed once its last record was written

    @property
    def label(self) -> str:
        return self.system + (" + compile" if self.compiled else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITE_DEFAULTS), default=None,
                   help="cpu: clip-tiny on the CPU (train_vs_open_clip.md); gpu: ViT-B-16 bf16 with compile "
                        "variants, MFU and memory (train_vs_open_clip_gpu.md). Default: gpu with --device cuda, "
                        "else cpu. The options below default to the suite's values")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cpu (suite cpu) or cuda (suite gpu)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per run, after the warm-up "
                   "(a multiple of --log-every; cpu 80, gpu 80)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps left out of the timing (a multiple of "
                   "--log-every; cpu 10, gpu 20)")
    p.add_argument("--log-every", type=int, default=None, help=f"steps per timing window, both systems "
                   f"(default {LOG_EVERY}; the cpu suite's is fixed)")
    p.add_argument("--batch-size", type=int, default=None, help="global = per-GPU batch (cpu 64, gpu 256)")
    p.add_argument("--model", default=None, help=f"gpu suite: open_clip model name (default {GPU_MODEL})")
    p.add_argument("--config", default=None, help=f"gpu suite: our base config (default {GPU_CONFIG}); batch, "
                   "data, schedule, precision and logging are set on top")
    p.add_argument("--precision", choices=sorted(OPEN_CLIP_PRECISION), default=None,
                   help="gpu suite: ours train.precision; open_clip_train gets fp32 / amp_bf16 / amp (default bf16)")
    p.add_argument("--workers", type=int, default=None, help="loader processes per trainer (cpu 1, gpu 12)")
    p.add_argument("--variants", default=None,
                   help=f"gpu suite: comma-separated runs in order, of {', '.join(VARIANTS)} (default: all four "
                        "in that order)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for both trainers (cpu 2, this machine's core count; gpu 0); 0 leaves it unset")
    p.add_argument("--repeats", type=int, default=None, help="runs per system, alternating ABBA-style (cpu 3, gpu 1)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the shards are written or reused (cpu: runs/bench_data; gpu: runs/bench_shards_<size>px)")
    p.add_argument("--image-size", type=int, default=RENDER_IMAGE_SIZE,
                   help=f"gpu suite: side of the rendered images in px (default {RENDER_IMAGE_SIZE})")
    p.add_argument("--render-samples", type=int, default=RENDER_SAMPLES,
                   help=f"gpu suite: training samples to render (default {RENDER_SAMPLES})")
    p.add_argument("--render-parts", type=int, default=RENDER_PARTS,
                   help=f"gpu suite: folders the samples are split into, one rendering process each at a time "
                        f"(default {RENDER_PARTS}); --render-samples must divide by it")
    p.add_argument("--render-processes", type=int, default=0,
                   help="gpu suite: parallel rendering processes (default: min(parts, CPU cores))")
    p.add_argument("--render-only", action="store_true", help="write (or check) the shards, print the pattern, exit")
    p.add_argument("--open-clip-python", default=None,
                   help="open_clip_train's interpreter: 'venv' (create or reuse --venv, the cpu suite's default), "
                        "'current' (this interpreter, the gpu suite's default) or a path to a python")
    p.add_argument("--open-clip-pythonpath", default="",
                   help="directories put in front of PYTHONPATH for open_clip_train only (e.g. one holding "
                        "webdataset 0.2.86 and pandas)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak for MFU (default: the GPU's dense bf16 datasheet figure from "
                        "pipeline.train.device_peak.DEVICE_PEAK_TFLOPS; none on a CPU)")
    p.add_argument("--venv", type=Path,
                   default=Path(os.environ.get("OPEN_CLIP_TRAIN_VENV", REPO / "runs" / "venv-open_clip_train")),
                   help="open_clip_train's virtual environment, created if missing "
                        "(default $OPEN_CLIP_TRAIN_VENV or runs/venv-open_clip_train)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench" / "train_vs_open_clip",
                   help="run directories and logs (default runs/bench/train_vs_open_clip)")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown report to write ('' to skip; cpu: bench/results/train_vs_open_clip.md, "
                        "gpu: bench/results/train_vs_open_clip_gpu.md)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for our trainer, e.g. train.zero_stage=0 (repeatable; the "
                        "comparison is then no longer like for like, the report lists them)")
    p.add_argument("--timeout", type=int, default=None, help="seconds allowed per training run (cpu 900, gpu 240)")
    p.add_argument("--retries", type=int, default=None,
                   help=f"make a run again (up to this many times) when other processes used more than "
                        f"{int(100 * IDLE_BUSY)}%% of the CPU during it (cpu 3, gpu 0)")
    p.add_argument("--wait-idle", type=int, default=None,
                   help=f"before each run, wait up to this many seconds for other processes to use less than "
                        f"{int(100 * IDLE_BUSY)}%% of the CPU (cpu 600, gpu 0: do not wait)")
    args = p.parse_args(argv)
    args.suite = args.suite or ("gpu" if args.device == "cuda" else "cpu")
    for key, value in SUITE_DEFAULTS[args.suite].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.suite == "cpu":
        fixed = {"model": MODEL, "config": CONFIG, "precision": "fp32", "workers": 1, "log_every": LOG_EVERY,
                 "variants": "ours,open_clip", "device": "cpu", "render_only": False}
        changed = [k for k, v in fixed.items() if getattr(args, k) != v]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} is fixed in the cpu suite (its report describes those "
                    "settings); use --suite gpu (with --device cpu for a CPU run of it)")
    if args.log_every < 1:
        p.error("--log-every must be >= 1")
    le = args.log_every
    if args.steps <= 0 or args.steps % le or args.warmup_steps < 0 or args.warmup_steps % le:
        p.error(f"--steps must be a positive multiple of {le} (--log-every), --warmup-steps a multiple of {le}")
    if args.repeats < 1 or args.batch_size < 1 or args.threads < 0 or args.retries < 0 or args.workers < 0:
        p.error("--repeats and --batch-size must be >= 1, --threads, --retries and --workers >= 0")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list or len(set(args.variant_list)) != len(args.variant_list):
        p.error(f"--variants: give distinct names among {', '.join(VARIANTS)} (got {args.variants!r})")
    if args.render_samples < 1 or args.render_parts < 1 or args.render_samples % args.render_parts:
        p.error(f"--render-samples ({args.render_samples}) must be a positive multiple of --render-parts "
                f"({args.render_parts})")
    if args.image_size < 16 or args.render_processes < 0 or args.peak_tflops < 0:
        p.error("--image-size must be >= 16, --render-processes and --peak-tflops >= 0")
    if args.data_dir is None:
        args.data_dir = REPO / "runs" / f"bench_shards_{args.image_size}px"
    args.data_dir, args.venv, args.work_dir = (x.resolve() for x in (args.data_dir, args.venv, args.work_dir))
    return args


# ---------------------------------------------------------------------------------------------- setup

def prepare_data(data_dir: Path) -> str:
    """The train shard pattern (absolute), written by our demo dataset code if not there yet."""
    from pipeline.demo_data.shapes import write_demo_dataset

    try:
        pattern = write_demo_dataset(data_dir)["train"]
    except Exception as e:  # noqa: BLE001 - any failure here ends the benchmark with one line
        raise BenchError(f"could not write the demo dataset to {data_dir}: {e}") from None
    return str(Path(pattern).resolve()) if not Path(pattern).is_absolute() else pattern


def _render_part(job: tuple) -> int:
    """Writes part `part` (samples part*n .. part*n + n - 1 of the demo data's train split) into its own folder.

    write_demo_dataset renders serially and always starts at key 0, so the parallel render uses its pieces:
    each sample is shapes.render_sample(seed, "train", global index) under the key of that index, so
    every image and key is unique over the parts and the content does not depend on how many processes ran."""
    from pipeline.demo_data.shapes import render_sample
    from pipeline.shard.writer import ShardWriter

    out, part, n, per_shard, size, seed = job
    folder = Path(out) / f"part{part:02d}"
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier render leaves nothing half-valid behind
    with ShardWriter(folder, prefix="train", samples_per_shard=per_shard) as w:
        for i in range(part * n, (part + 1) * n):
            jpg, caption, label = render_sample(seed, "train", i, size)
            w.write(f"{i:09d}", {"jpg": jpg, "txt": caption, "cls": str(label),
                                 "json": json.dumps({"split": "train", "index": i})})
    return len(w.shards)


def render_shards(data_dir: Path, samples: int = RENDER_SAMPLES, parts: int = RENDER_PARTS,
                  image_size: int = RENDER_IMAGE_SIZE, processes: int = 0, samples_per_shard: int = RENDER_SHARD_SAMPLES,
                  seed: int = 0, quiet: bool = False) -> dict:
    """Demo shards at `image_size` px in `parts` folders rendered in parallel; reused when a complete earlier
    render has the same settings. Returns the manifest: {"pattern", "samples", "shards", "settings", "render_s"}.

    The pattern is one braceexpand expression over all parts (data_dir/part{00..15}/train-{000000..000002}.tar),
    which both trainers take as one source (a '::' list would be several weighted sources for ours)."""
    if samples < 1 or not 1 <= parts <= 100 or samples % parts:
        raise BenchError(f"{samples} samples do not split into {parts} equal parts (1 to 100 parts)")
    per_part = samples // parts
    settings = {"samples": samples, "parts": parts, "samples_per_shard": samples_per_shard,
                "image_size": image_size, "seed": seed, "split": "train"}
    manifest = data_dir / RENDER_MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("settings") == settings:
            return previous
    processes = processes or min(parts, os.cpu_count() or 1)
    if not quiet:
        print(f"rendering {samples} samples at {image_size} px into {data_dir} ({parts} parts, {processes} "
              f"processes) ...", end=" ", flush=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    start = time.perf_counter()
    jobs = [(str(data_dir), k, per_part, samples_per_shard, image_size, seed) for k in range(parts)]
    try:
        # fork: the parent has not touched CUDA (device queries run in a child process), and the workers only
        # need the already-imported pipeline code.
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            counts = pool.map(_render_part, jobs)
    except Exception as e:  # noqa: BLE001 - any failure here ends the benchmark with one line
        raise BenchError(f"could not render the shards into {data_dir}: {type(e).__name__}: {e}") from None
    if len(set(counts)) != 1:
        raise BenchError(f"parts got different shard counts {counts}; cannot write one pattern")
    from pipeline.shard.writer import shard_pattern

    part_glob = f"part{{00..{parts - 1:02d}}}" if parts > 1 else "part00"  # braceexpand keeps the zero padding

    pattern = str(data_dir / part_glob / shard_pattern("train", counts[0]))
    result = {"pattern": pattern, "samples": samples, "shards": parts * counts[0], "settings": settings,
              "render_s": round(time.perf_counter() - start, 1), "processes": processes}
    manifest.write_text(json.dumps(result, indent=2))  # last: its presence marks a complete render
    if not quiet:
        print(f"{result['shards']} shards in {result['render_s']:.0f}s", flush=True)
    return result


def our_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise BenchError(f"{dist} is not installed in this environment ({sys.executable}); run the script with "
                         "the project's .venv/bin/python") from None


def open_clip_requirements() -> list[str]:
    return [f"{d}=={our_version(d)}" for d in PINNED_FROM_OURS] + [WEBDATASET_SPEC, *EXTRA]


def run_quiet(cmd: list[str], log: Path, what: str, **kw) -> None:
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}); see {log}")


def ensure_open_clip_venv(venv: Path, log_dir: Path) -> tuple[Path, dict]:
    """Creates or updates open_clip_train's environment; returns its python and its package versions."""
    python = venv / "bin" / "python"
    requirements = open_clip_requirements()
    stamp = venv / REQUIREMENTS_STAMP
    log = log_dir / "venv-install.log"
    if not (python.exists() and stamp.is_file() and stamp.read_text().split() == requirements):
        print(f"setting up open_clip_train's environment in {venv} (a few minutes the first time) ...", flush=True)
        log.write_text("")
        if not python.exists():
            run_quiet([sys.executable, "-m", "venv", str(venv)], log, f"creating the virtual environment {venv}")
        run_quiet([str(python), "-m", "pip", "install", *requirements], log,
                  f"installing open_clip_train's packages into {venv}")
        stamp.write_text("\n".join(requirements) + "\n")
    probe = ("import json, importlib.metadata as m, open_clip_train.main; "
             "print(json.dumps({d: m.version(d) for d in ['torch', 'torchvision', 'open_clip_torch', 'webdataset']}))")
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
        versions = json.loads(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, json.JSONDecodeError, IndexError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        last = detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__
        raise BenchError(f"open_clip_train does not import in {venv}: {last} (delete {venv} to rebuild it)") from None
    for dist in ("torch", "open_clip_torch"):
        if versions[dist] != our_version(dist):
            raise BenchError(f"{venv} has {dist} {versions[dist]}, ours is {our_version(dist)}; delete {venv} "
                             "to rebuild it")
    return python, versions


def child_env(threads: int) -> dict:
    """Our environment without launcher variables (both runs are plain single processes)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def open_clip_env(base: dict, pythonpath: str) -> dict:
    """`base` with `pythonpath` (':'-separated directories) in front of PYTHONPATH, for open_clip_train only."""
    env = dict(base)
    if pythonpath:
        dirs = [str(Path(d).resolve()) for d in pythonpath.split(":") if d]
        env["PYTHONPATH"] = ":".join(dirs + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def probe_open_clip_python(python: Path, env: dict) -> dict:
    """Versions seen by `python` under `env`; fails in one line when open_clip_train does not import or its
    webdataset is too new for it."""
    probe = ("import json, importlib.metadata as m, open_clip_train.main; print(json.dumps({d: m.version(d) for d "
             "in ['torch', 'torchvision', 'open_clip_torch', 'webdataset']}))")
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, env=env,
                             cwd=REPO).stdout
        versions = json.loads(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, json.JSONDecodeError, IndexError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        last = detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__
        raise BenchError(f"open_clip_train does not import with {python}: {last}") from None
    if _version_tuple(versions["webdataset"]) >= WEBDATASET_MAX:
        raise BenchError(f"{python} sees webdataset {versions['webdataset']}; open_clip_train needs "
                         f"{WEBDATASET_SPEC} (put such a webdataset in front with --open-clip-pythonpath, or use "
                         "--open-clip-python venv)")
    for dist in ("torch", "open_clip_torch"):
        if versions[dist] != our_version(dist):
            raise BenchError(f"{python} has {dist} {versions[dist]}, ours is {our_version(dist)}")
    return versions


def resolve_open_clip_python(args: argparse.Namespace, env: dict) -> tuple[Path, dict]:
    """open_clip_train's interpreter and its package versions, per --open-clip-python."""
    if args.open_clip_python == "venv":
        if args.open_clip_pythonpath:
            raise BenchError("--open-clip-pythonpath applies to --open-clip-python current or a path, not venv")
        return ensure_open_clip_venv(args.venv, args.work_dir)
    python = Path(sys.executable if args.open_clip_python == "current" else args.open_clip_python)
    if not python.exists():
        raise BenchError(f"--open-clip-python: {python} does not exist")
    return python, probe_open_clip_python(python, env)


# ---------------------------------------------------------------------------------------------- machine load

def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores), from /proc/stat; nan elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process and its finished, waited-for descendants."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def other_cpu_share(sample_s: float = 3.0) -> float:
    """Share of the machine's CPU (0..1) used by processes other than this one over `sample_s` seconds."""
    busy, own, start = machine_busy_s(), own_cpu_s(), time.perf_counter()
    time.sleep(sample_s)
    elapsed = time.perf_counter() - start
    return max(0.0, (machine_busy_s() - busy - (own_cpu_s() - own)) / (elapsed * (os.cpu_count() or 1)))


def wait_for_quiet_machine(max_wait_s: int) -> None:
    """Waits (up to `max_wait_s`) until other processes use less than IDLE_BUSY of the CPU."""
    if max_wait_s <= 0:
        return
    deadline = time.perf_counter() + max_wait_s
    share = other_cpu_share()
    if share != share or share < IDLE_BUSY:  # nan: no /proc/stat, nothing to wait for
        return
    print(f"(other processes use {100 * share:.0f}% of the CPU; waiting up to {max_wait_s}s for them) ",
          end="", flush=True)
    while share >= IDLE_BUSY and time.perf_counter() < deadline:
        time.sleep(7)
        share = other_cpu_share()
    if share >= IDLE_BUSY:
        print(f"(still {100 * share:.0f}% busy; measuring anyway) ", end="", flush=True)


# ---------------------------------------------------------------------------------------------- runs

def has_config_key(section: str, key: str) -> bool:
    """Whether this checkout's config has `section.key` (train.compile is new; older checkouts refuse it)."""
    import dataclasses

    from pipeline.config import RunConfig

    part = getattr(RunConfig(), section, None)
    return dataclasses.is_dataclass(part) and key in {f.name for f in dataclasses.fields(part)}


def ours_command(args: argparse.Namespace, train_pattern: str, out_dir: Path, compiled: bool = False) -> list[str]:
    total = args.warmup_steps + args.steps
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", args.config,
           f"data.train={train_pattern}", "data.val=", "data.classes=", f"data.workers={args.workers}",
           f"train.out_dir={out_dir}", f"train.steps={total}", f"train.batch_size={args.batch_size}",
           f"train.precision={args.precision}", f"train.lr={LR}", f"train.warmup_steps={WARMUP}",
           f"train.weight_decay={WEIGHT_DECAY}", f"train.grad_clip={GRAD_CLIP}", f"train.seed={SEED}",
           f"train.log_every={args.log_every}", "train.ckpt_every=0", "train.progress=false",
           "train.eval_at_end=false", "train.resume=none"]
    if args.suite == "gpu":
        # The base config is a production one (e.g. global batch 32768): the batch must be the comparison's.
        cmd += [f"model.name={args.model}", f"train.global_batch_size={args.batch_size}", "train.grad_accum=1",
                f"train.betas=[{BETAS[0]},{BETAS[1]}]", f"train.eps={EPS}"]
        if compiled or has_config_key("train", "compile"):
            cmd.append(f"train.compile={'true' if compiled else 'false'}")
    return cmd + list(args.ours_set)


def open_clip_steps(args: argparse.Namespace) -> int:
    """Steps open_clip_train is asked for: one more than ours (it also logs after its first step), rounded up
    to a multiple of the loader workers, as its webdataset epoch is (whole batches per worker)."""
    workers = max(1, args.workers)
    return math.ceil((args.warmup_steps + args.steps + 1) / workers) * workers


def open_clip_command(args: argparse.Namespace, python: Path, train_pattern: str, name: str,
                      compiled: bool = False) -> list[str]:
    cmd = [str(python), str(BENCH / "open_clip_train_entry.py"),
           "--model", args.model, "--train-data", train_pattern, "--dataset-type", "webdataset",
           "--train-num-samples", str(open_clip_steps(args) * args.batch_size), "--epochs", "1",
           "--batch-size", str(args.batch_size), "--precision", OPEN_CLIP_PRECISION[args.precision],
           "--workers", str(args.workers), "--device", args.device,
           "--lr", str(LR), "--warmup", str(WARMUP), "--wd", str(WEIGHT_DECAY),
           "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
           "--grad-clip-norm", str(GRAD_CLIP), "--seed", str(SEED),
           "--log-every-n-steps", str(args.log_every), "--report-to", "", "--save-frequency", "0",
           "--logs", str(args.work_dir), "--name", name]
    return cmd + (["--torchcompile"] if compiled else [])


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends the run's whole process group (loader workers, compile workers), which we started for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def execute(run: Run, env: dict, timeout: int, stop_when=None) -> str:
    """Runs `run.command` from the repository root in its own process group, output to `run.log`; returns the
    output. `stop_when()` (polled) ends a run that has given all its numbers and would only write a checkpoint."""
    start, busy, own = time.perf_counter(), machine_busy_s(), own_cpu_s()
    with open(run.log, "w") as f:
        f.write(f"$ {shlex.join(run.command)}\n")
        f.flush()
        proc = subprocess.Popen(run.command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop_when is not None and stop_when():
                    run.stopped_after_last_window, rc = True, 0
                    break
                if time.perf_counter() - start > timeout:
                    raise BenchError(f"{run.label} run {run.repeat} took longer than {timeout}s; see {run.log}")
        finally:
            _kill_group(proc)  # also when interrupted: no orphan keeps the GPU or the CPUs
    run.wall_s = time.perf_counter() - start
    others = machine_busy_s() - busy - (own_cpu_s() - own)
    run.other_cpu = max(0.0, others / (run.wall_s * (os.cpu_count() or 1)))
    output = run.log.read_text(errors="replace")
    if rc != 0:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        raise BenchError(f"{run.label} run {run.repeat} failed (exit {rc}): {lines[-1] if lines else ''} "
                         f"-- see {run.log}")
    return output


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl records; a line cut short by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _has_step(path: Path, step: int) -> bool:
    try:
        return any(r.get("step") == step for r in read_records(path))
    except OSError:
        return False


def run_ours(args: argparse.Namespace, train_pattern: str, repeat: int, env: dict, compiled: bool = False) -> Run:
    tag = f"ours{'-compile' if compiled else ''}-{repeat}"
    out_dir = args.work_dir / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    run = Run(OURS, repeat, ours_command(args, train_pattern, out_dir, compiled), args.work_dir / f"{tag}.log",
              compiled=compiled, timing="metrics.jsonl samples_per_s")
    metrics = out_dir / "metrics.jsonl"
    total = args.warmup_steps + args.steps
    # GPU suite: stop once the last window is logged; the final checkpoint (always written by the loop) is not
    # training throughput and only costs time on the GPU machine.
    stop = (lambda: _has_step(metrics, total)) if args.suite == "gpu" else None
    try:
        execute(run, env, args.timeout, stop)
    except BenchError as e:
        if args.suite == "cpu":
            raise
        run.error = str(e)  # the GPU suite keeps what the run logged before it failed
    finally:
        if args.suite == "gpu":  # a checkpoint begun before the stop is partial and large: not a result
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    if not metrics.is_file():
        if args.suite == "cpu":
            raise BenchError(f"{OURS} run {repeat} wrote no {metrics}; see {run.log}")
        run.error = run.error or f"wrote no {metrics}; see {run.log}"
        return run
    records = read_records(metrics)
    previous = 0
    for r in records:
        if "samples_per_s" in r:
            if previous >= args.warmup_steps and r["step"] - previous == args.log_every:
                run.samples_per_s.append(r["samples_per_s"])
                run.data_wait_frac.append(r.get("data_wait_frac", float("nan")))
                if isinstance(r.get("step_time_ms"), (int, float)):  # newer trainers: mean step time of the window
                    run.step_time_ms.append(r["step_time_ms"])
                if isinstance(r.get("mfu"), (int, float)):
                    run.trainer_mfu.append(r["mfu"])
            previous = r["step"]
    peaks = [r["peak_mem_gib"] for r in records if isinstance(r.get("peak_mem_gib"), (int, float))]
    run.peak_mem_gib = max(peaks) if peaks else None  # max_memory_allocated is cumulative; the max is the run's
    return run


def parse_open_clip_windows(text: str, batch_size: int, skip_steps: int, log_every: int,
                            last_step: int | None = None) -> list[tuple[int, int, float, float]]:
    """(first step, last step, Data (t), Batch (t)) of each full window that starts after `skip_steps` steps and
    ends by `last_step`, from the 'Train Epoch' lines."""
    windows, previous = [], None
    for m in OPEN_CLIP_LINE.finditer(text):
        step = int(m.group(1)) // batch_size  # steps done (1 process)
        if (previous is not None and previous >= skip_steps and step - previous == log_every
                and (last_step is None or step <= last_step)):
            windows.append((previous, step, float(m.group(2)), float(m.group(3))))
        previous = step
    return windows


def parse_open_clip_log(text: str, batch_size: int, skip_steps: int) -> tuple[list[float], list[float]]:
    """Per full window after `skip_steps` steps: (samples/s, data-wait fraction) from the 'Train Epoch' lines."""
    rates, waits = [], []
    for _, _, data_t, batch_t in parse_open_clip_windows(text, batch_size, skip_steps, LOG_EVERY):
        if batch_t > 0:
            rates.append(batch_size / batch_t)
            waits.append(data_t / batch_t)
    return rates, waits


def step_end_times(text: str) -> list[float]:
    m = STEP_TIMES_LINE.search(text)
    return json.loads(m.group(1)) if m else []


def run_open_clip(args: argparse.Namespace, python: Path, train_pattern: str, repeat: int, env: dict,
                  compiled: bool = False) -> Run:
    name = f"open_clip_train{'-compile' if compiled else ''}-{repeat}"
    shutil.rmtree(args.work_dir / name, ignore_errors=True)  # it refuses to reuse an experiment name
    run = Run(OPEN_CLIP, repeat, open_clip_command(args, python, train_pattern, name, compiled),
              args.work_dir / f"{name}.log", compiled=compiled)
    if args.suite == "cpu":
        output = execute(run, env, args.timeout)
        run.samples_per_s, run.data_wait_frac = parse_open_clip_log(output, args.batch_size, args.warmup_steps + 1)
        run.timing = "Batch (t)"
        return run
    try:
        output = execute(run, env, args.timeout)
    except BenchError as e:
        run.error = str(e)
        output = run.log.read_text(errors="replace") if run.log.is_file() else ""
    skip = args.warmup_steps + 1
    times = step_end_times(output)
    for first, last, data_t, batch_t in parse_open_clip_windows(output, args.batch_size, skip, args.log_every,
                                                                 skip + args.steps):
        if len(times) >= last:  # the entry's clock: same window, full precision
            step_s, run.timing = (times[last - 1] - times[first - 1]) / (last - first), "step-end clock"
        else:
            step_s, run.timing = batch_t, "Batch (t)"
        run.samples_per_s.append(args.batch_size / step_s if step_s > 0 else float("nan"))
        run.data_wait_frac.append(data_t / step_s if step_s > 0 else float("nan"))
    m = PEAK_MEM_LINE.search(output)
    run.peak_mem_gib = int(m.group(1)) / 2**30 if m else None
    return run


# ---------------------------------------------------------------------------------------------- report

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pooled(runs: list[Run], system: str, attr: str = "samples_per_s") -> list[float]:
    return [v for r in runs if r.system == system for v in getattr(r, attr)]


def command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    lscpu = command_output(["lscpu"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "unknown")
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    if commit == "unknown" and os.environ.get("BENCH_GIT_COMMIT"):  # a copied work tree without .git (GPU machine)
        commit, dirty = os.environ["BENCH_GIT_COMMIT"] + " (from BENCH_GIT_COMMIT: the work tree has no .git)", ""
    return {
        "cpu": cpu, "cores": os.cpu_count(), "date": command_output(["date", "-u"]),
        "commit": commit + (" (with uncommitted changes to tracked files)" if dirty not in ("", "unknown") else ""),
        "python": platform.python_version(),
    }


def result_table(runs: list[Run]) -> tuple[list[list[str]], float, float]:
    ours, theirs = median(pooled(runs, OURS)), median(pooled(runs, OPEN_CLIP))
    rows = [[OURS, f"{ours:.1f}", f"{ours / theirs:.2f}"], [OPEN_CLIP, f"{theirs:.1f}", "1.00"]]
    return rows, ours, theirs


def format_plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def relative(text: str) -> str:
    """`text` with paths inside the repository written relative to it."""
    return text.replace(str(REPO) + "/", "")


def display_command(cmd: list[str]) -> str:
    return shlex.join(relative(part) for part in cmd)


def write_report(path: Path, args: argparse.Namespace, argv: list[str], runs: list[Run], info: dict,
                 oc_versions: dict, train_pattern: str, setup_s: float, runs_s: float) -> None:
    rows, _, _ = result_table(runs)
    script = shlex.join([".venv/bin/python", "bench/train_vs_open_clip.py", *argv])
    detail_rows = [[r.system, str(r.repeat), str(len(r.samples_per_s)), f"{median(r.samples_per_s):.1f}",
                    f"{min(r.samples_per_s):.1f} - {max(r.samples_per_s):.1f}",
                    f"{100 * median(r.data_wait_frac):.1f}%", f"{r.wall_s:.0f}", f"{100 * r.other_cpu:.0f}%",
                    str(r.attempts)] for r in runs]
    busy_runs = [r for r in runs if r.other_cpu > IDLE_BUSY]
    load_note = (f"**Warning:** other processes used more than {100 * IDLE_BUSY:.0f}% of the CPU during "
                 f"{len(busy_runs)} of {len(runs)} kept runs (column \"other CPU\" below); their numbers are low "
                 "and noisy.\n\n" if busy_runs else "")
    first = {s: next(r for r in runs if r.system == s) for s in (OURS, OPEN_CLIP)}
    threads = str(args.threads) if args.threads else "unset (library default)"
    pair_ratios = []
    for k in range(1, args.repeats + 1):
        pair = {r.system: median(r.samples_per_s) for r in runs if r.repeat == k}
        pair_ratios.append(f"{pair[OURS] / pair[OPEN_CLIP]:.2f}")
    overrides = f"\n- **Extra overrides for our trainer:** `{' '.join(args.ours_set)}`" if args.ours_set else ""
    per_run = args.steps // LOG_EVERY
    oc = oc_versions
    text = f"""# Training throughput: our trainer vs open_clip_train (CPU, 1 process)

Rerun from the repository root:

    {script}

(This time: {(setup_s + runs_s) / 60:.1f} minutes end to end, of which {setup_s / 60:.1f} to write or check the shards and open_clip_train's environment; both are reused on later runs.)

## Result

{format_markdown(["system", "samples/s (median)", "ratio (ours / open_clip_train)"], rows)}

{load_note}Median samples/s over {len(pooled(runs, OURS))} windows of {LOG_EVERY} steps per system ({args.repeats} run(s) x {per_run} windows; the first {args.warmup_steps} steps of each run are left out as warm-up). A ratio above 1 means our trainer is faster. Ratio of the two systems' medians for run 1, 2, ... (same repeat number, run back to back): {", ".join(pair_ratios)}.

## Machine and software

- Device: {info['cpu']}, {info['cores']} cores (`lscpu`, `os.cpu_count()`), no GPU
- Date: {info['date']}
- Git commit: {info['commit']}
- Python {info['python']}; ours: torch {our_version('torch')}, deepspeed {our_version('deepspeed')}, open_clip_torch {our_version('open_clip_torch')}, webdataset {our_version('webdataset')}
- open_clip_train environment (`{relative(str(args.venv))}`): torch {oc['torch']}, torchvision {oc['torchvision']}, open_clip_torch {oc['open_clip_torch']}, webdataset {oc['webdataset']}; timm, numpy, pillow, ftfy, regex and the other shared packages at our versions

## Settings (both systems)

- Model `{MODEL}` (`configs/model/{MODEL}.json`: 48px images, ViT 4 layers width 128, text 4 layers width 128, context 24), random init, seed {SEED}
- Data: `{relative(train_pattern)}` (demo dataset from `pipeline.demo_data.shapes`: 20 shards, 20000 samples, 64px JPEGs), 1 loader worker process
- Batch {args.batch_size}, fp32, 1 process on the CPU, OMP_NUM_THREADS={threads}
- {args.warmup_steps} warm-up + {args.steps} timed steps (open_clip_train: one step more, see the caveats)
- AdamW lr {LR}, betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY} (not on gains, biases, logit scale), linear warm-up {WARMUP} steps then cosine, gradient clipping at norm {GRAD_CLIP}
- No evaluation; no checkpoint during the timed steps (each saves one after its last step){overrides}
- Order of the runs: {", ".join(f"{r.system} #{r.repeat}" for r in runs)}

Commands (from the repository root; run directories and logs under `{relative(str(args.work_dir))}`):

    {display_command(first[OURS].command)}

    {display_command(first[OPEN_CLIP].command)}

## Per run

{format_markdown(["system", "run", "windows", "median samples/s", "range", "data wait (median)", "wall s",
                  "other CPU", "attempts"], detail_rows)}

"data wait": share of the window the training process spent waiting for the next batch. "wall s": the whole process, start-up and the final checkpoint included. "other CPU": share of the machine's CPU used by processes outside the benchmark during the run (/proc/stat less the benchmark's own process tree). Each run starts once that share is below {100 * IDLE_BUSY:.0f}% (waiting up to {args.wait_idle}s), and a run during which it went above is made again, up to {args.retries} times ("attempts"; the last one is kept).

## Differences between the two setups (caveats)

- Training step. Ours: {ours_step(CONFIG, ["train.precision=fp32", *args.ours_set], "cpu")}. open_clip_train: a plain PyTorch loop (no DDP with one process), `torch.nn.utils.clip_grad_norm_`, `optimizer.step()` over the parameter tensors, then an in-place clamp of the logit scale.
- Optimizer: `torch.optim.AdamW` with the same hyper-parameters on both sides. The no-decay sets are matched by slightly different name rules (ours: ndim < 2, `ln_`, `norm`, `.bias`, `logit_`; open_clip_train: ndim < 2, `bn`, `ln`, `bias`, `logit_scale`), which does not change the work done.
- Loss: ours `pipeline.objectives.clip_loss` (float32 cast, no gather with one process); open_clip_train `open_clip.ClipLoss`. Same computation.
- Data loading: ours reads samples by offset from the indexed shards (`pipeline.data.loader`: order shuffled in blocks of 4096, per-sample seeded augmentation, tokenization per batch, DataLoader prefetch 4). open_clip_train streams the tars with webdataset (shard shuffle, 5000-sample shuffle buffer filled to 1000 before the first batch, tokenization per sample, prefetch 2). Both use the same open_clip train transform and tokenizer. With 1 worker on {info['cores']} cores the worker competes with the training threads for the CPU.
- Timing: ours times each window of {LOG_EVERY} steps with wall time in the training loop; open_clip_train averages per-step times measured between consecutive step ends (printed to 1 ms, about 0.2% of a step here). Both include waiting for data. open_clip_train also logs after its first step, so its windows end one step later: it runs {args.warmup_steps + args.steps + 1} steps and skips the first {args.warmup_steps + 1}, ours runs {args.warmup_steps + args.steps} and skips {args.warmup_steps}; both give {per_run} windows of {LOG_EVERY} steps per run.
- open_clip_train needs webdataset < 0.2.96 (newer releases emit an end-of-shard marker that its `group_by_keys_nothrow` does not handle: KeyError 'fname'), hence the separate environment.
- A shared 2-core virtual machine is noisy, even with no other process running: compare the ranges in the per-run table before reading much into differences of a few percent.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ours_step(config: str, overrides: list[str], device: str) -> str:
    """What our trainer's optimizer step is for this config on one rank, in words (pipeline.train.engine decides:
    its plain step on one rank, else DeepSpeed's ZeRO optimizer)."""
    try:
        from pipeline.config import load_config
        from pipeline.train import engine
        cfg = load_config(config, list(overrides))
        precision = engine.resolve_precision(cfg.train.precision) if device == "cuda" else cfg.train.precision
        plain = engine.plain_step(cfg, 1) if hasattr(engine, "plain_step") else False
    except Exception as e:  # noqa: BLE001 - only the report's wording depends on it
        return f"a DeepSpeed engine (its step could not be described: {type(e).__name__})"
    group = "NCCL" if device == "cuda" else "gloo"
    if plain:
        return (f"a DeepSpeed engine at ZeRO stage 0 in a one-process {group} group running our plain step on one "
                f"rank (`pipeline.train.engine.plain_step`): fp32 weights{' under bf16 autocast' if precision == 'bf16' else ''}, "
                "torch's AdamW, gradient clipping and a non-finite guard on the device")
    return (f"a DeepSpeed engine (ZeRO stage {cfg.train.zero_stage}, from `{config}`) in a one-process {group} group: "
            f"{precision} weights, gradients through DeepSpeed's flat buffers and reduce hooks, DeepSpeed computes the "
            "gradient norm and clips, and the optimizer steps over the flattened fp32 partition")


# ---------------------------------------------------------------------------------------------- GPU suite

# Run in a child process: the benchmark's own process must not hold a CUDA context (memory, and forked
# children) while the trainers run. The peak is the trainer's own table, so MFU here and in metrics.jsonl agree.
DEVICE_PROBE = """
import json, torch
out = {"cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(name=torch.cuda.get_device_name(0), total_memory=p.total_memory, count=torch.cuda.device_count(),
               capability=list(torch.cuda.get_device_capability(0)))
print(json.dumps(out))
"""


def cuda_device_info(env: dict) -> dict:
    """{"name", "total_memory" (bytes), "count", "capability", "cuda"} of GPU 0, from a child
    process; BenchError when torch sees no GPU."""
    try:
        out = subprocess.run([sys.executable, "-c", DEVICE_PROBE], capture_output=True, text=True, check=True,
                             env=env, cwd=REPO).stdout
        info = json.loads(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, json.JSONDecodeError, IndexError, OSError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        raise BenchError(f"could not query the GPU: {detail.splitlines()[-1] if detail else type(e).__name__}") from None
    if "name" not in info:
        raise BenchError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return info


def datasheet_peak(name: str) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, where it comes from) for a device name: the trainer's table,
    pipeline.train.device_peak.DEVICE_PEAK_TFLOPS; (0, "") when it has no entry."""
    from pipeline.train.device_peak import peak_tflops_of

    value, key = peak_tflops_of(name)
    return (value, f"{key} dense bf16 datasheet figure (pipeline.train.device_peak.DEVICE_PEAK_TFLOPS)") if key \
        else (0.0, "")


def model_flops(name: str) -> tuple[float, int, int]:
    """(forward + backward FLOPs per image-text pair, image size, context length) of open_clip model `name` by
    pipeline.models.clip.clip_step_flops, the count our trainer's MFU uses; built on the meta device."""
    import open_clip

    from pipeline.models.clip import ModelNameError, clip_step_flops
    from pipeline.plan import image_size, meta_model

    try:
        model = meta_model(name)
    except ModelNameError as e:
        raise BenchError(str(e)) from None
    size, context = image_size(model), open_clip.get_tokenizer(name).context_length
    return float(clip_step_flops(model)), size, int(context)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of `values`; nan when empty."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def _fmt(x: float | None, spec: str = ".1f", none: str = "n/a") -> str:
    return none if x is None or x != x else format(x, spec)


@dataclass
class GpuContext:
    """What the GPU suite's report needs besides the runs."""
    argv: list[str]
    device: str  # in words
    device_note: str
    peak_tflops: float
    peak_source: str
    flops: float  # per pair, forward + backward
    model_image_size: int
    context: int
    shards: dict
    oc_python: str
    oc_versions: dict
    planned: list[tuple[str, int]]  # (variant, repeat) in run order
    started: float
    setup_s: float
    info: dict = field(default_factory=dict)


def run_mfu(run: Run, ctx: GpuContext) -> float | None:
    if not ctx.peak_tflops or not run.samples_per_s:
        return None
    return median(run.samples_per_s) * ctx.flops / (ctx.peak_tflops * 1e12)


def summary_line(run: Run, ctx: GpuContext, batch: int) -> str:
    if not run.samples_per_s:
        return f"no result: {run.error}"
    s = run.samples_per_s
    mfu = run_mfu(run, ctx)
    text = (f"{median(s):.1f} samples/s (median of {len(s)} windows; min {min(s):.1f}, max {max(s):.1f}), "
            f"{1000 * batch / median(s):.1f} ms/step")
    text += f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
    text += f", peak {run.peak_mem_gib:.2f} GiB" if run.peak_mem_gib is not None else ""
    text += f", {run.wall_s:.0f}s"
    return text + (f" [{run.error}]" if run.error else "")


def gpu_result_rows(runs: list[Run], ctx: GpuContext, batch: int) -> list[list[str]]:
    base = {}  # open_clip_train's median per compile setting, pooled over repeats
    for compiled in (False, True):
        values = [v for r in runs if r.system == OPEN_CLIP and r.compiled == compiled for v in r.samples_per_s]
        base[compiled] = median(values) if values else None
    rows = []
    for variant in dict.fromkeys(v for v, _ in ctx.planned):
        system, compiled = VARIANTS[variant]
        mine = [r for r in runs if r.system == system and r.compiled == compiled]
        values = [v for r in mine for v in r.samples_per_s]
        label = system + (" + compile" if compiled else "")
        if not values:
            why = "; ".join(r.error for r in mine if r.error) or "not run (the suite stopped before it)"
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", relative(why)])
            continue
        med = median(values)
        ratio = f"{med / base[compiled]:.2f}" if base[compiled] else "-"
        spread = " / ".join(_fmt(x) for x in (min(values), percentile(values, 10), percentile(values, 90),
                                               max(values)))
        mfu = run_mfu(Run(system, 0, [], Path(), samples_per_s=values), ctx)
        peaks = [r.peak_mem_gib for r in mine if r.peak_mem_gib is not None]
        waits = [v for r in mine for v in r.data_wait_frac if v == v]
        rows.append([label, f"{med:.1f}", ratio, spread, f"{1000 * batch / med:.1f}",
                     f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                     f"{max(peaks):.2f}" if peaks else "n/a", f"{100 * median(waits):.1f}%" if waits else "n/a",
                     relative("; ".join(r.error for r in mine if r.error)) or "ok"])
    return rows


GPU_HEADER = ["system", "samples/s (median)", "vs open_clip_train (same compile setting)",
              "window samples/s: min / p10 / p90 / max", "ms/step (median)", "MFU", "peak GPU memory (GiB)",
              "data wait", "status"]


def write_gpu_report(path: Path, args: argparse.Namespace, runs: list[Run], ctx: GpuContext) -> None:
    batch = args.batch_size
    rows = gpu_result_rows(runs, ctx, batch)
    script = shlex.join(["python", "bench/train_vs_open_clip.py", *ctx.argv])
    best = {}
    for system in (OURS, OPEN_CLIP):
        values = [median(r.samples_per_s) for r in runs if r.system == system and r.samples_per_s]
        best[system] = max(values) if values else None
    best_line = (f"Best of each (fastest variant's median): ours {best[OURS]:.1f} vs open_clip_train "
                 f"{best[OPEN_CLIP]:.1f} samples/s, ratio {best[OURS] / best[OPEN_CLIP]:.2f}."
                 if best[OURS] and best[OPEN_CLIP] else "")
    detail = []
    for r in runs:
        s = r.samples_per_s
        detail.append([r.label, str(r.repeat), str(len(s)), _fmt(median(s)) if s else "-",
                       f"{min(s):.1f} - {max(s):.1f}" if s else "-",
                       _fmt(median(r.step_time_ms)) if r.step_time_ms else "n/a",
                       f"{100 * median(r.trainer_mfu):.1f}%" if r.trainer_mfu else "n/a",
                       _fmt(r.peak_mem_gib, ".2f"), f"{r.wall_s:.0f}", r.timing or "-",
                       ("stopped after its last window" if r.stopped_after_last_window else "exited")
                       if not r.error else relative(r.error)])
    pending = ctx.planned[len(runs):]
    pending_note = (f"\n**Incomplete:** {len(pending)} planned run(s) not made: "
                    f"{', '.join(f'{v} #{k}' for v, k in pending)}.\n" if pending else "")
    info = ctx.info
    peak = (f"{ctx.peak_tflops:g} TFLOP/s per device ({ctx.peak_source})" if ctx.peak_tflops
            else "none (no peak known for this device: MFU is not reported; --peak-tflops sets one)")
    shards = ctx.shards
    oc = ctx.oc_versions
    overrides = f"\n- **Extra overrides for our trainer:** `{' '.join(args.ours_set)}`" if args.ours_set else ""
    commands = "\n\n".join(f"    {display_command(r.command)}" for r in runs)
    model_px = ctx.model_image_size
    text = f"""# Training throughput on one GPU: our trainer vs open_clip_train

Rerun from the repository root (open_clip_train needs webdataset < 0.2.96 on this interpreter's path):

    {script}

(This time: {(time.perf_counter() - ctx.started) / 60:.1f} minutes end to end, of which {ctx.setup_s / 60:.1f} to render or check the shards and probe the device and open_clip_train.)
{pending_note}
## Result

{format_markdown(GPU_HEADER, rows)}

{best_line}

Median samples/s over windows of {args.log_every} steps after {args.warmup_steps} warm-up steps ({args.steps // args.log_every} windows per run, {args.repeats} run(s) per variant); a ratio above 1 means our trainer is faster. Spread: the lowest, 10th and 90th percentile and highest window. ms/step = batch / median samples/s. MFU = samples/s x {ctx.flops / 1e9:.2f} GFLOP per image-text pair (`pipeline.models.clip.clip_step_flops` for {args.model} at {model_px} px, context {ctx.context}: each tower's forward counted by torch's FlopCounterMode on the meta device, x3 for forward + backward, pipeline/train/flops.py; the same count for both trainers, so compiled or not, a faster run is a higher MFU) / peak, with peak = {peak}. Peak GPU memory: `torch.cuda.max_memory_allocated()` over the whole run in each trainer's process (ours: `peak_mem_gib` of metrics.jsonl; open_clip_train: printed at exit by `bench/open_clip_train_entry.py`); the CUDA context and the allocator's cached but unallocated blocks are not in it.

## Machine and software

- Device: {ctx.device}{ctx.device_note}; {info['cores']} CPU cores ({info['cpu']})
- Date: {info['date']}
- Git commit: {info['commit']}
- Python {info['python']} ({sys.executable}); torch {our_version('torch')}, triton {_dist_version('triton')}, deepspeed {_dist_version('deepspeed')}, open_clip_torch {_dist_version('open_clip_torch')}; our trainer's webdataset (unused by it) {_dist_version('webdataset')}
- open_clip_train: `{relative(ctx.oc_python)}` with webdataset {oc.get('webdataset', 'n/a')}, torch {oc.get('torch', 'n/a')}, open_clip_torch {oc.get('open_clip_torch', 'n/a')}{f" (PYTHONPATH starts with `{args.open_clip_pythonpath}`)" if args.open_clip_pythonpath else ""}

## Settings (both systems)

- Model `{args.model}` ({model_px} px images), random init, seed {SEED}; ours from `{args.config}` (ZeRO stage and the rest of that config) with the batch, data, schedule and logging below on top
- Data: `{relative(shards['pattern'])}`: {shards['samples']} demo images ({shards['settings']['image_size']} px JPEGs rendered by `pipeline.demo_data.shapes.render_sample`, keys = sample index) in {shards['shards']} shards of {shards['settings']['samples_per_shard']}, {shards['settings']['parts']} folders rendered in parallel; {args.workers} loader worker processes per trainer; both use open_clip's train transform (RandomResizedCrop {model_px}, scale 0.9-1) and tokenizer
- Global batch {batch} on one {args.device.upper()} device, precision: ours `train.precision={args.precision}`{" (one rank: fp32 weights, autocast)" if args.precision == "bf16" else " (DeepSpeed fp16: loss scaling)" if args.precision == "fp16" else ""}, open_clip_train `--precision {OPEN_CLIP_PRECISION[args.precision]}`{" (fp32 weights, autocast)" if args.precision != "fp32" else ""}
- {args.warmup_steps} warm-up + {args.steps} timed steps (open_clip_train: one step more, and {open_clip_steps(args)} in all, see the caveats)
- AdamW lr {LR}, betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY} (not on gains, biases, logit scale), linear warm-up {WARMUP} steps then cosine, gradient clipping at norm {GRAD_CLIP}
- Compile: ours `train.compile=true`; open_clip_train `--torchcompile` (torch.compile of the model){overrides}
- OMP_NUM_THREADS: {args.threads or 'unset'}; each run under a {args.timeout}s timeout; order: {", ".join(f"{v} #{k}" for v, k in ctx.planned)}

Commands (from the repository root; run directories and logs under `{relative(str(args.work_dir))}`):

{commands}

## Per run

{format_markdown(["system", "run", "windows", "median samples/s", "range", "trainer's step_time_ms (median)", "trainer's own MFU (median)", "peak GiB", "wall s", "window timing", "end"], detail)}

"wall s": the whole process, start-up, loader start and compilation included (with compilation, a later run can reuse TorchInductor's cache from an earlier one). Our trainer is stopped once it has logged its last window: the loop would then only write its final checkpoint. "window timing": ours, `samples_per_s` of metrics.jsonl; open_clip_train, the step-end clock of `bench/open_clip_train_entry.py` over the same windows as its `Batch (t)` (which it prints to 1 ms only).

## Differences between the two setups (caveats)

- Training step. Ours: {ours_step(args.config, [f"train.precision={args.precision}", *args.ours_set], args.device)}; `train.compile=true` is DeepSpeed's `engine.compile()` (torch.compile of the module's forward). open_clip_train: a plain PyTorch loop (no DDP with one process), `torch.nn.utils.clip_grad_norm_`, `optimizer.step()` (AdamW), then an in-place clamp of the logit scale{"; with amp_bf16, fp32 weights under bf16 autocast" if args.precision == "bf16" else ""}; `--torchcompile` is torch.compile of the model.
- Data loading: ours reads samples by offset from the indexed shards, each batch built by one worker (batch k by worker k mod {args.workers}), images decoded and cropped on uint8 and normalised on the GPU. open_clip_train streams the tars with webdataset (each worker its own shards and whole batches, 1000-5000-sample shuffle buffer, PIL transform to float tensors). Both include waiting for data in their step times ("data wait" is the share of the window spent waiting).
- open_clip_train logs after its first step, so its windows end one step later: it skips {args.warmup_steps + 1} steps and times the next {args.steps}; its webdataset epoch is whole batches per worker, so it is asked for {open_clip_steps(args)} steps (a multiple of {max(1, args.workers)} workers) and the windows after step {args.warmup_steps + 1 + args.steps} are not used.
- Both processes sync the GPU only at log steps (`loss.item()` and the like), so a window's time is the time between two such points: per-window numbers, not per-step ones.
- One run per variant on a machine borrowed for minutes: compare the window spreads before reading much into differences of a few percent.
"""
    from pipeline.atomic_write import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)  # a kill while writing leaves the previous complete report


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def main_gpu(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    shards = render_shards(args.data_dir, args.render_samples, args.render_parts, args.image_size,
                           args.render_processes)
    if args.render_only:
        print(f"shards: {shards['pattern']} ({shards['samples']} samples, {shards['shards']} shards; "
              f"rendered in {shards['render_s']:.0f}s with {shards.get('processes', '?')} processes)")
        return 0
    env = child_env(args.threads)
    env["PYTHONUNBUFFERED"] = "1"  # a killed run's log still holds everything it printed
    oc_env = open_clip_env(env, args.open_clip_pythonpath)
    wants_oc = any(VARIANTS[v][0] == OPEN_CLIP for v in args.variant_list)
    oc_python, oc_versions, oc_error = Path("-"), {}, ""
    if wants_oc:
        try:
            oc_python, oc_versions = resolve_open_clip_python(args, oc_env)
        except BenchError as e:  # our runs still give their numbers; the report says why open_clip_train has none
            oc_error = str(e)
            print(f"open_clip_train cannot run: {e}", flush=True)
    flops, model_px, context = model_flops(args.model)
    if args.device == "cuda":
        dev = cuda_device_info(env)
        device = f"{dev['name']} ({dev['total_memory'] / 2**30:.1f} GiB, `torch.cuda.get_device_name`)"
        note = f", {dev['count']} visible, CUDA {dev['cuda']}, compute capability {'.'.join(map(str, dev['capability']))}"
        peak, source = datasheet_peak(dev["name"])
    else:
        device, note, peak, source = "CPU (no GPU)", "", 0.0, ""
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    planned = []
    for repeat in range(1, args.repeats + 1):  # ABBA over repeats: the order reverses every other repeat
        order = args.variant_list if repeat % 2 else list(reversed(args.variant_list))
        planned += [(v, repeat) for v in order]
    ctx = GpuContext(argv, device, note, peak, source, flops, model_px, context, shards, str(oc_python),
                     oc_versions, planned, started, time.perf_counter() - started, machine_info())
    compile_key = has_config_key("train", "compile")
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {args.workers} workers, "
          f"{args.warmup_steps} + {args.steps} steps per run on {device}; "
          f"{flops / 1e9:.2f} GFLOP per pair; peak {peak:g} TFLOP/s" + (f" ({source})" if source else ""), flush=True)
    report = args.results if str(args.results) not in ("", ".") else None
    runs: list[Run] = []
    try:
        for i, (variant, repeat) in enumerate(planned, 1):
            system, compiled = VARIANTS[variant]
            label = system + (" + compile" if compiled else "")
            print(f"[{i}/{len(planned)}] {label} run {repeat}: {args.warmup_steps} + {args.steps} steps ...",
                  end=" ", flush=True)
            if system == OURS and compiled and not compile_key:
                tag = f"ours-compile-{repeat}"
                run = Run(OURS, repeat, ours_command(args, shards["pattern"], args.work_dir / tag, True),
                          args.work_dir / f"{tag}.log", compiled=True,
                          error="not run: train.compile is not a config key in this checkout (pipeline/config.py)")
            elif system == OURS:
                run = run_ours(args, shards["pattern"], repeat, env, compiled)
            elif oc_error:
                name = f"open_clip_train{'-compile' if compiled else ''}-{repeat}"
                run = Run(OPEN_CLIP, repeat, open_clip_command(args, oc_python, shards["pattern"], name, compiled),
                          args.work_dir / f"{name}.log", compiled=compiled, error=f"not run: {oc_error}")
            else:
                run = run_open_clip(args, oc_python, shards["pattern"], repeat, oc_env, compiled)
            expected = args.steps // args.log_every
            if not run.error and len(run.samples_per_s) != expected:
                run.error = f"found {len(run.samples_per_s)} timing windows, expected {expected}; see {run.log}"
            runs.append(run)
            print(summary_line(run, ctx, args.batch_size), flush=True)
            if report:
                write_gpu_report(report, args, runs, ctx)
    except Interrupted as e:
        print(f"\n{e}; the report keeps the {len(runs)} finished run(s)", file=sys.stderr, flush=True)
        if report:
            write_gpu_report(report, args, runs, ctx)
        return 124
    print()
    print(format_plain(GPU_HEADER, gpu_result_rows(runs, ctx, args.batch_size)))
    if report:
        write_gpu_report(report, args, runs, ctx)
        print(f"\nreport written to {report}")
    failed = [r for r in runs if r.error]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)  # e.g. `timeout`: kill the running trainer, keep finished runs
    if args.suite == "gpu":
        return main_gpu(args, argv)
    start = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train_pattern = prepare_data(args.data_dir)
    env = child_env(args.threads)
    oc_env = open_clip_env(env, args.open_clip_pythonpath)
    python, oc_versions = resolve_open_clip_python(args, oc_env)
    setup_s, start = time.perf_counter() - start, time.perf_counter()

    plan = []  # ABBA: ours, open_clip, open_clip, ours, ...
    for repeat in range(1, args.repeats + 1):
        pair = [OURS, OPEN_CLIP] if repeat % 2 else [OPEN_CLIP, OURS]
        plan += [(system, repeat) for system in pair]
    runs = []
    for i, (system, repeat) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {system} run {repeat}: {args.warmup_steps} + {args.steps} steps ...", end=" ",
              flush=True)
        for attempt in range(1, args.retries + 2):
            wait_for_quiet_machine(args.wait_idle)
            run = (run_ours(args, train_pattern, repeat, env) if system == OURS
                   else run_open_clip(args, python, train_pattern, repeat, oc_env))
            run.attempts = attempt
            if run.other_cpu <= IDLE_BUSY or attempt > args.retries:
                break
            print(f"disturbed ({median(run.samples_per_s):.1f} samples/s while other processes used "
                  f"{100 * run.other_cpu:.0f}% of the CPU), running it again ...", end=" ", flush=True)
        expected = args.steps // LOG_EVERY
        if len(run.samples_per_s) != expected:
            raise BenchError(f"{system} run {repeat}: found {len(run.samples_per_s)} timing windows, expected "
                             f"{expected}; see {run.log}")
        print(f"{median(run.samples_per_s):.1f} samples/s (median of {expected} windows), {run.wall_s:.0f}s, "
              f"other processes {100 * run.other_cpu:.0f}% CPU", flush=True)
        runs.append(run)

    rows, _, _ = result_table(runs)
    threads = args.threads or "unset"
    print(f"\nclip-tiny, batch {args.batch_size}, fp32, 1 process on the CPU, OMP_NUM_THREADS={threads}, "
          f"{args.repeats} x {args.steps} timed steps per system\n")
    print(format_plain(["system", "samples/s (median)", "ratio (ours / open_clip_train)"], rows))
    disturbed = [r for r in runs if r.other_cpu > IDLE_BUSY]
    if disturbed:
        print(f"warning: other processes used more than {100 * IDLE_BUSY:.0f}% of the CPU during "
              f"{len(disturbed)} of {len(runs)} runs; their numbers are low and noisy")
    if str(args.results) not in ("", "."):
        write_report(args.results, args, argv, runs, machine_info(), oc_versions, train_pattern, setup_s,
                     time.perf_counter() - start)
        print(f"\nreport written to {args.results}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
