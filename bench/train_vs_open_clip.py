"""Training throughput (samples/s) of our trainer vs open_clip_train, same shards / model / batch / precision.

Run from the repository root (about 7 minutes on 2 CPU cores once the shards and the environment exist):

    .venv/bin/python bench/train_vs_open_clip.py

What it does, in one run:
  1. writes (or reuses) the demo shards with pipeline.data.demo_dataset (20 tar shards, 20000 samples);
  2. creates (or reuses) a separate virtual environment for open_clip_train: the same torch, torchvision,
     open_clip_torch and image/tokenizer stack as ours, plus webdataset 0.2.x, which open_clip_train needs
     (our environment has webdataset 1.x);
  3. trains clip-tiny with each system for the same number of steps, 1 process on the CPU, batch 64, fp32,
     1 loader worker, the same OMP_NUM_THREADS; runs alternate ABBA-style when --repeats > 1; a run starts
     when other processes leave the CPU alone and is made again if they took more than 10% of it meanwhile;
  4. takes each system's throughput over 10-step windows after the warm-up steps, prints the medians and
     their ratio, and writes bench/results/train_vs_open_clip.md.

Timing: each system's own per-window numbers are used. Ours: `samples_per_s` of metrics.jsonl (wall time of
10 steps, data waits included). open_clip_train: 64 / `Batch (t)` of its log lines, where `Batch (t)` is the
mean time per step since its previous log line, data waits included. open_clip_train also logs after its
first step, so it runs one step more and skips one step more, giving the same number of 10-step windows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CONFIG = "configs/demo/clip_tiny.yaml"
MODEL = "clip-tiny"
LOG_EVERY = 10  # steps per timing window, both systems
LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP, SEED = 1e-3, 50, 0.1, (0.9, 0.98), 1e-6, 1.0, 0
OURS, OPEN_CLIP = "ours (pipeline)", "open_clip_train"

# open_clip_train's data.py stops with KeyError 'fname' on webdataset >= 0.2.96 (an end-of-shard marker it
# does not expect); 0.2.86 is the newest release before that marker.
WEBDATASET_SPEC = "webdataset>=0.2.5,<0.2.96"
# Installed in the open_clip_train environment at exactly the versions our environment has, so that model,
# image decoding, transforms and tokenizer are the same code on both sides.
PINNED_FROM_OURS = ["torch", "torchvision", "open_clip_torch", "timm", "numpy", "pillow", "ftfy", "regex",
                    "safetensors", "huggingface_hub", "tqdm", "braceexpand", "fsspec"]
EXTRA = ["pandas"]  # imported by open_clip_train.data
REQUIREMENTS_STAMP = "bench-requirements.txt"

IDLE_BUSY = 0.1  # machine CPU share used by others below which a run may start

OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


class BenchError(Exception):
    """Stops the benchmark; the message is printed as one line."""


@dataclass
class Run:
    system: str
    repeat: int
    command: list[str]
    log: Path
    wall_s: float = 0.0
    samples_per_s: list[float] = field(default_factory=list)  # per timed window
    data_wait_frac: list[float] = field(default_factory=list)  # per timed window
    other_cpu: float = float("nan")  # share of the machine's CPU used by other processes during the run
    attempts: int = 1  # runs made for this one (disturbed runs are made again, see --retries)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80, help="timed training steps per run, after the warm-up "
                   f"(multiple of {LOG_EVERY}; default 80)")
    p.add_argument("--warmup-steps", type=int, default=10, help=f"steps left out of the timing (multiple of "
                   f"{LOG_EVERY}; default 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2,
                   help="OMP_NUM_THREADS for both trainers (default 2, this machine's core count); 0 leaves it unset")
    p.add_argument("--repeats", type=int, default=3, help="runs per system, alternating ABBA-style (default 3)")
    p.add_argument("--data-dir", type=Path, default=REPO / "runs" / "bench_data",
                   help="where the demo shards are written or reused (default runs/bench_data)")
    p.add_argument("--venv", type=Path,
                   default=Path(os.environ.get("OPEN_CLIP_TRAIN_VENV", REPO / "runs" / "venv-open_clip_train")),
                   help="open_clip_train's virtual environment, created if missing "
                        "(default $OPEN_CLIP_TRAIN_VENV or runs/venv-open_clip_train)")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench" / "train_vs_open_clip",
                   help="run directories and logs (default runs/bench/train_vs_open_clip)")
    p.add_argument("--results", type=Path, default=BENCH / "results" / "train_vs_open_clip.md",
                   help="Markdown report to write ('' to skip)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for our trainer, e.g. train.zero_stage=0 (repeatable; the "
                        "comparison is then no longer like for like, the report lists them)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per training run (default 900)")
    p.add_argument("--retries", type=int, default=3,
                   help=f"make a run again (up to this many times) when other processes used more than "
                        f"{int(100 * IDLE_BUSY)}%% of the CPU during it (default 3)")
    p.add_argument("--wait-idle", type=int, default=600,
                   help=f"before each run, wait up to this many seconds for other processes to use less than "
                        f"{int(100 * IDLE_BUSY)}%% of the CPU (default 600; 0: do not wait)")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.steps % LOG_EVERY or args.warmup_steps < 0 or args.warmup_steps % LOG_EVERY:
        p.error(f"--steps must be a positive multiple of {LOG_EVERY}, --warmup-steps a multiple of {LOG_EVERY}")
    if args.repeats < 1 or args.batch_size < 1 or args.threads < 0 or args.retries < 0:
        p.error("--repeats and --batch-size must be >= 1, --threads and --retries >= 0")
    args.data_dir, args.venv, args.work_dir = (x.resolve() for x in (args.data_dir, args.venv, args.work_dir))
    return args


# ---------------------------------------------------------------------------------------------- setup

def prepare_data(data_dir: Path) -> str:
    """The train shard pattern (absolute), written by our demo dataset code if not there yet."""
    from pipeline.data.demo_dataset import write_demo_dataset

    try:
        pattern = write_demo_dataset(data_dir)["train"]
    except Exception as e:  # noqa: BLE001 - any failure here ends the benchmark with one line
        raise BenchError(f"could not write the demo dataset to {data_dir}: {e}") from None
    return str(Path(pattern).resolve()) if not Path(pattern).is_absolute() else pattern


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

def ours_command(args: argparse.Namespace, train_pattern: str, out_dir: Path) -> list[str]:
    total = args.warmup_steps + args.steps
    return [sys.executable, "-m", "pipeline", "train", "--config", CONFIG,
            f"data.train={train_pattern}", "data.val=", "data.classes=", "data.workers=1",
            f"train.out_dir={out_dir}", f"train.steps={total}", f"train.batch_size={args.batch_size}",
            "train.precision=fp32", f"train.lr={LR}", f"train.warmup_steps={WARMUP}",
            f"train.weight_decay={WEIGHT_DECAY}", f"train.grad_clip={GRAD_CLIP}", f"train.seed={SEED}",
            f"train.log_every={LOG_EVERY}", "train.ckpt_every=0", "train.progress=false",
            "train.eval_at_end=false", "train.resume=none", *args.ours_set]


def open_clip_command(args: argparse.Namespace, python: Path, train_pattern: str, name: str) -> list[str]:
    # One step more than ours: open_clip_train logs after its first step, which becomes an extra window.
    total = args.warmup_steps + args.steps + 1
    return [str(python), str(BENCH / "open_clip_train_entry.py"),
            "--model", MODEL, "--train-data", train_pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str(total * args.batch_size), "--epochs", "1",
            "--batch-size", str(args.batch_size), "--precision", "fp32", "--workers", "1", "--device", "cpu",
            "--lr", str(LR), "--warmup", str(WARMUP), "--wd", str(WEIGHT_DECAY),
            "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
            "--grad-clip-norm", str(GRAD_CLIP), "--seed", str(SEED),
            "--log-every-n-steps", str(LOG_EVERY), "--report-to", "", "--save-frequency", "0",
            "--logs", str(args.work_dir), "--name", name]


def execute(run: Run, env: dict, timeout: int) -> str:
    """Runs `run.command` from the repository root, output to `run.log`; returns the output."""
    start, busy, own = time.perf_counter(), machine_busy_s(), own_cpu_s()
    with open(run.log, "w") as f:
        f.write(f"$ {shlex.join(run.command)}\n")
        f.flush()
        try:
            rc = subprocess.call(run.command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{run.system} run {run.repeat} took longer than {timeout}s; see {run.log}") from None
    run.wall_s = time.perf_counter() - start
    others = machine_busy_s() - busy - (own_cpu_s() - own)
    run.other_cpu = max(0.0, others / (run.wall_s * (os.cpu_count() or 1)))
    output = run.log.read_text(errors="replace")
    if rc != 0:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        raise BenchError(f"{run.system} run {run.repeat} failed (exit {rc}): {lines[-1] if lines else ''} "
                         f"-- see {run.log}")
    return output


def run_ours(args: argparse.Namespace, train_pattern: str, repeat: int, env: dict) -> Run:
    out_dir = args.work_dir / f"ours-{repeat}"
    shutil.rmtree(out_dir, ignore_errors=True)
    run = Run(OURS, repeat, ours_command(args, train_pattern, out_dir), args.work_dir / f"ours-{repeat}.log")
    execute(run, env, args.timeout)
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise BenchError(f"{OURS} run {repeat} wrote no {metrics}; see {run.log}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    previous = 0
    for r in records:
        if "samples_per_s" in r:
            if previous >= args.warmup_steps and r["step"] - previous == LOG_EVERY:
                run.samples_per_s.append(r["samples_per_s"])
                run.data_wait_frac.append(r.get("data_wait_frac", float("nan")))
            previous = r["step"]
    return run


def parse_open_clip_log(text: str, batch_size: int, skip_steps: int) -> tuple[list[float], list[float]]:
    """Per full window after `skip_steps` steps: (samples/s, data-wait fraction) from the 'Train Epoch' lines."""
    rates, waits, previous = [], [], None
    for m in OPEN_CLIP_LINE.finditer(text):
        step = int(m.group(1)) // batch_size  # steps done (1 process)
        data_t, batch_t = float(m.group(2)), float(m.group(3))
        if previous is not None and previous >= skip_steps and step - previous == LOG_EVERY and batch_t > 0:
            rates.append(batch_size / batch_t)
            waits.append(data_t / batch_t)
        previous = step
    return rates, waits


def run_open_clip(args: argparse.Namespace, python: Path, train_pattern: str, repeat: int, env: dict) -> Run:
    name = f"open_clip_train-{repeat}"
    shutil.rmtree(args.work_dir / name, ignore_errors=True)  # it refuses to reuse an experiment name
    run = Run(OPEN_CLIP, repeat, open_clip_command(args, python, train_pattern, name),
              args.work_dir / f"{name}.log")
    output = execute(run, env, args.timeout)
    run.samples_per_s, run.data_wait_frac = parse_open_clip_log(output, args.batch_size, args.warmup_steps + 1)
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
- Data: `{relative(train_pattern)}` (demo dataset from `pipeline.data.demo_dataset`: 20 shards, 20000 samples, 64px JPEGs), 1 loader worker process
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

- Training step. Ours: a DeepSpeed engine (ZeRO stage 1, from `{CONFIG}`) in a one-process gloo group: gradients go through DeepSpeed's flat fp32 buffers and reduce hooks, DeepSpeed computes the gradient norm and clips, and the optimizer steps over the flattened partition. open_clip_train: a plain PyTorch loop (no DDP with one process), `torch.nn.utils.clip_grad_norm_`, `optimizer.step()` over the parameter tensors, then an in-place clamp of the logit scale.
- Optimizer: `torch.optim.AdamW` with the same hyper-parameters on both sides. The no-decay sets are matched by slightly different name rules (ours: ndim < 2, `ln_`, `norm`, `.bias`, `logit_`; open_clip_train: ndim < 2, `bn`, `ln`, `bias`, `logit_scale`), which does not change the work done.
- Loss: ours `pipeline.objectives.clip_loss` (float32 cast, no gather with one process); open_clip_train `open_clip.ClipLoss`. Same computation.
- Data loading: ours reads samples by offset from the indexed shards (`pipeline.data.loader`: order shuffled in blocks of 4096, per-sample seeded augmentation, tokenization per batch, DataLoader prefetch 4). open_clip_train streams the tars with webdataset (shard shuffle, 5000-sample shuffle buffer filled to 1000 before the first batch, tokenization per sample, prefetch 2). Both use the same open_clip train transform and tokenizer. With 1 worker on {info['cores']} cores the worker competes with the training threads for the CPU.
- Timing: ours times each window of {LOG_EVERY} steps with wall time in the training loop; open_clip_train averages per-step times measured between consecutive step ends (printed to 1 ms, about 0.2% of a step here). Both include waiting for data. open_clip_train also logs after its first step, so its windows end one step later: it runs {args.warmup_steps + args.steps + 1} steps and skips the first {args.warmup_steps + 1}, ours runs {args.warmup_steps + args.steps} and skips {args.warmup_steps}; both give {per_run} windows of {LOG_EVERY} steps per run.
- open_clip_train needs webdataset < 0.2.96 (newer releases emit an end-of-shard marker that its `group_by_keys_nothrow` does not handle: KeyError 'fname'), hence the separate environment.
- A shared 2-core virtual machine is noisy, even with no other process running: compare the ranges in the per-run table before reading much into differences of a few percent.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train_pattern = prepare_data(args.data_dir)
    python, oc_versions = ensure_open_clip_venv(args.venv, args.work_dir)
    setup_s, start = time.perf_counter() - start, time.perf_counter()
    env = child_env(args.threads)

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
                   else run_open_clip(args, python, train_pattern, repeat, env))
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
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
