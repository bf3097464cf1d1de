"""Window-attention benchmark: our Triton kernels against the torch.compile'd reference, PyTorch SDPA with a
materialised bias + shift mask and the eager reference (timm's steps); V1 and V2; windows 7x7, 8x8, 12x12, 16x16
and 24x24 at SwinV2 stage-1 shapes; forward, backward and forward+backward, each also as a fraction of the bytes
floor at the HBM bandwidth measured in the same run; then the SwinV2-B/16 training step with and without the
kernel (images/s).

    python bench/window_attention_bench.py --out bench/results/window_attention_h200.md   # GPU, ~2 min
    python bench/window_attention_bench.py --device cpu --smoke                          # CPU smoke (interpreter)

Output. Each row is printed and appended to --out (flushed and synced) as soon as it is measured, so a timeout
loses only the row in progress; the file starts with the device, date, git commit, versions and the measured
copy bandwidth. Rows: per case and method, fwd / bwd / fwd+bwd median ms (triton.testing.do_bench), the % of the
bytes floor each reaches (`kernels.window_attention.bytes_moved`: every tensor read or written once, at the
measured device-to-device copy bandwidth), the method's fwd+bwd time over ours (in the compiled row: ours
against torch.compile), peak memory of one forward+backward.

Time (GPU). Compilation dominates a cold run: every Triton configuration of every kernel variant autotuning
tries (~190 kernels for the default cases and the training step, ~12 min of compiling on one core), and
torch.compile (forward and backward) once per shape. So the run has two phases:
1. warm-up (--warm-workers processes, default all CPUs but two, --warm-deadline-s): each job runs one case once
   with one forced autotune configuration (kernels.window_attention.FORCE_CONFIG) or compiles the reference for
   one shape, filling Triton's and Inductor's disk caches in parallel. Nothing is timed.
2. timed, in this process only, in priority order (bandwidth, training step, V2 then V1 cases): autotuning and
   torch.compile now load from the caches. --budget-s bounds the whole run: a row is not started past it
   (listed as skipped), and torch.compile is skipped for the remaining shapes once --compile-budget-s of
   compile time is spent in this phase (said in the row).
Default run: ~40-60 s of warm-up on 14 workers, ~60-80 s timed on an H200 (estimate; --budget-s 150 caps it).

CPU (--device cpu, implied without CUDA): the kernels run under TRITON_INTERPRET=1; --smoke uses tiny shapes
and a tiny model, just to prove the code paths; its times mean nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("ours", "compiled", "sdpa", "eager")
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One attention call: a SwinV2 stage shape (patch 4, head dim 32), shifted windows (the block with the
    seam mask), V1 (scaled dot product) or V2 (cosine, logit scale at init)."""
    name: str
    B: int
    H: int
    C: int
    heads: int
    window: int
    v2: bool

    @property
    def W(self) -> int:
        return self.H

    @property
    def shift(self) -> tuple[int, int]:
        return self.window // 2, self.window // 2

    @property
    def label(self) -> str:
        return f"{self.name} ({'V2' if self.v2 else 'V1'}, {self.window}x{self.window})"


def _cases(shapes, variants) -> list[Case]:
    return [Case(name, B, H, C, heads, w, v == "v2") for v in variants for (name, B, H, C, heads, w) in shapes]


# (name, B, H = W of the stage map, C, heads, window): stage 1 of the model that uses each window
GPU_SHAPES = [
    ("SwinV2-T/8 s1 @256", 64, 64, 96, 3, 8),
    ("SwinV2-B/16 s1 @256", 64, 64, 128, 4, 16),
    ("SwinV2-B/24 s1 @384", 16, 96, 128, 4, 24),
    ("SwinV2-B/12 s1 @192", 64, 48, 128, 4, 12),
    ("Swin-T/7 s1 @224", 64, 56, 96, 3, 7),
]
FULL_EXTRA_SHAPES = [  # --full: the later stages too
    ("SwinV2-T/8 s2 @256", 64, 32, 192, 6, 8),
    ("SwinV2-T/8 s3 @256", 64, 16, 384, 12, 8),
    ("SwinV2-B/16 s2 @256", 64, 32, 256, 8, 16),
    ("SwinV2-B/24 s2 @384", 16, 48, 256, 8, 24),
    ("SwinV2-B/24 s4 @384 (w12)", 16, 12, 1024, 32, 12),
]
SMOKE_SHAPES = [  # N = 16, 49 (padded tile) and 81 (tiled path)
    ("smoke w4", 1, 8, 32, 2, 4),
    ("smoke w7", 1, 14, 32, 2, 7),
    ("smoke w9 (tiled)", 1, 18, 32, 2, 9),
]


def _wa():
    """The kernel module, imported late: TRITON_INTERPRET must be set first on the CPU."""
    import kernels.window_attention as wa
    return wa


def make_inputs(case: Case, dtype, device, bias_dtype=torch.float32, seed=0):
    """(qkv, bias, logit_scale or None, dout): leaves that require grad, drawn on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    N = case.window ** 2
    qkv = torch.randn(case.B, case.H, case.W, 3 * case.C, generator=g, device=device, dtype=dtype)
    bias = torch.randn(case.heads, N, N, generator=g, device=device)
    if case.v2:
        bias = 16 * torch.sigmoid(bias)
        ls = torch.full((case.heads, 1, 1), math.log(10), device=device).requires_grad_(True)
    else:
        ls = None
    dout = torch.randn(case.B, case.H, case.W, case.C, generator=g, device=device, dtype=dtype)
    return qkv.requires_grad_(True), bias.to(bias_dtype).requires_grad_(True), ls, dout


def sdpa_attention(qkv, num_heads, window_size, shift_size, bias, logit_scale=None):
    """Roll + partition in torch, then F.scaled_dot_product_attention with the bias and shift mask materialised
    as one (B*nW, heads, N, N) additive mask (V2: normalised q, k and the per-head scale folded into q)."""
    wa = _wa()
    B, H, W = qkv.shape[:3]
    q, k, v = wa.window_qkv(qkv, num_heads, window_size, shift_size)   # B, nW, heads, N, d
    nW, N, d = q.shape[1], q.shape[3], q.shape[4]
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))                     # B*nW, heads, N, d (views)
    if logit_scale is None:
        scale = d ** -0.5
    else:
        q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=wa.LOGIT_SCALE_MAX).exp().to(q.dtype)
        k = F.normalize(k, dim=-1)
        scale = 1.0
    mask = bias.to(q.dtype)[None, None]                               # 1, 1, heads, N, N
    if any(shift_size):
        mask = mask + wa.shift_mask(H, W, window_size, shift_size, qkv.device, q.dtype)[None, :, None]
    mask = mask.expand(B, nW, num_heads, N, N).reshape(B * nW, num_heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return wa.window_merge(out.view(B, nW, num_heads, N, d), window_size, shift_size, H, W)


def attention_fn(method: str):
    wa = _wa()
    if method == "ours":
        return lambda *a: wa.window_attention(*a, impl="triton")
    if method == "eager":
        return wa.window_attention_reference
    if method == "sdpa":
        return sdpa_attention
    if method == "compiled":  # a fresh graph per shape (dynamic=False): the caller resets dynamo first
        return torch.compile(wa.window_attention_reference, dynamic=False)
    raise ValueError(method)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device, grad_to_none=None) -> float:
    """Median ms: triton.testing.do_bench on the GPU (10 ms warm-up, 50 ms of repetitions; L2 flushed between
    runs); on the CPU two timed calls (smoke only)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(2):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s: a 1 GiB fp32 tensor copied (read + write), median time."""
    n = 2 ** 28 if device.type == "cuda" else 2 ** 22
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    del a, b
    return 2 * n * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------- results file
class Results:
    """Rows go to stdout and are appended to the results file at once (flushed and fsynced)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    if sha:
        return sha + (" (with uncommitted changes)" if dirty else "")
    return os.environ.get("BENCH_COMMIT", "unknown (no git checkout here; set BENCH_COMMIT)")


def device_name(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Triton interpreter"


TABLE_HEAD = ("| case | method | fwd ms | bwd ms | fwd+bwd ms | % of bytes floor fwd / bwd / fwd+bwd | "
              "fwd+bwd time / ours | peak MiB | note |\n|---|---|---|---|---|---|---|---|---|")


def format_row(case: Case, r: dict) -> str:
    head = f"| {case.label}, B={case.B}, {case.H}x{case.W}, C={case.C} | {r['method']} |"
    if "total" not in r:
        return f"{head} | | | | | | {r.get('note', '')} |"
    pct = " / ".join(f"{p:.0f}%" for p in r["floor_pct"])
    vs = f"{r['vs_ours']:.2f}x" if r.get("vs_ours") else ""
    peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else ""
    return (f"{head} {r['fwd']:.3f} | {r['bwd']:.3f} | {r['total']:.3f} | {pct} | {vs} | {peak} | "
            f"{r.get('note', '')} |")


# ----------------------------------------------------------------------------------------------- measuring
def measure(case: Case, method: str, fn, inputs, device, bw: float, elem_bytes: int) -> dict:
    wa = _wa()
    qkv, bias, ls, dout = inputs
    ws = (case.window, case.window)
    params = [t for t in (qkv, bias, ls) if t is not None]
    call = lambda: fn(qkv, case.heads, ws, case.shift, bias, ls)
    row = {"method": method}
    t0 = time.perf_counter()
    call().backward(dout)  # compile / autotune outside the timed region
    _sync(device)
    row["first_s"] = time.perf_counter() - t0
    for t in params:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call().backward(dout)
        _sync(device)
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    row["fwd"] = bench_ms(call, device)  # the training forward (graph / log-sum-exp kept)
    row["total"] = bench_ms(lambda: call().backward(dout), device, grad_to_none=params)
    out = call()
    try:
        row["bwd"] = bench_ms(lambda: out.backward(dout, retain_graph=True), device, grad_to_none=params)
    except RuntimeError:  # a backward that cannot be replayed: the difference instead
        row["bwd"] = row["total"] - row["fwd"]
        row["note"] = "bwd = total - fwd"
    del out
    floor = [wa.bytes_moved(case.B, case.H, case.W, case.C, case.heads, ws, elem_bytes, 4, pass_=p)
             for p in PASSES]
    row["floor_pct"] = [100 * b / bw * 1e3 / row[k] for b, k in zip(floor, ("fwd", "bwd", "total"))]
    return row


def run_case(case: Case, methods, device, dtype, bw, state, results: Results, deadline: float,
             compile_budget: float) -> None:
    inputs = make_inputs(case, dtype, device)
    ours_total = None
    for method in methods:
        if time.perf_counter() > deadline:
            results.write(format_row(case, {"method": method, "note": "skipped: --budget-s reached"}))
            continue
        if method == "compiled" and state["compile_s"] > compile_budget:
            results.write(format_row(case, {"method": method, "note": f"skipped: compile budget "
                                                                       f"({compile_budget:.0f} s) spent"}))
            continue
        for t in inputs[:3]:
            if t is not None:
                t.grad = None
        try:
            if method == "compiled":
                torch._dynamo.reset()
            row = measure(case, method, attention_fn(method), inputs, device, bw, torch.finfo(dtype).bits // 8)
            if method == "compiled":
                state["compile_s"] += row["first_s"]
                row["note"] = (row.get("note", "") + f" compile+first call {row['first_s']:.1f} s").strip()
            if method == "ours":
                ours_total = row["total"]
            elif ours_total:
                row["vs_ours"] = row["total"] / ours_total
        except torch.OutOfMemoryError:
            row = {"method": method, "note": "OOM"}
        except Exception as e:  # one failing method must not lose the rest of the run
            row = {"method": method, "note": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        results.write(format_row(case, row))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del inputs


# ----------------------------------------------------------------------------------------------- training step
def train_model(smoke: bool, device=None):
    from pipeline.models.swinv2 import create_swinv2

    if smoke:
        return create_swinv2("swinv2_tiny_window8_256", img_size=32, window_size=4, depths=(1, 1, 1, 1),
                             num_classes=10, device=device), 32
    return create_swinv2("swinv2_base_window16_256", device=device), 256


def train_attention_calls(smoke: bool, batch: int) -> list[tuple]:
    """The distinct window_attention calls of one training step: (B, H, C, heads, window, shift) per block."""
    model, px = train_model(smoke, device="meta")
    calls = set()
    grid = model.patch_embed.grid_size[0]
    for i, stage in enumerate(model.layers):
        res = model._stage_resolution((grid, grid), i)[0]
        for blk in stage.blocks:
            calls.add((batch, res, blk.dim, blk.num_heads, blk.window_size[0], blk.shift_size[0]))
    return sorted(calls)


def train_step_rates(device, batch: int, steps: int, smoke: bool) -> dict:
    """Images/s of SwinV2-B/16 @256 training steps (bf16 autocast, AdamW) with the kernel and with the reference,
    back to back in this process; the kernel is measured twice (before and after) so that warm caches or clocks
    cannot favour it. Smoke: a tiny model in fp32 on the CPU."""
    model, px = train_model(smoke)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, px, px, device=device, generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), device=device, generator=g)
    rates = {}
    for run, impl in enumerate(("triton", "reference", "triton")):
        model.set_attn_impl(impl)
        warm = 2 if device.type == "cuda" else 1
        for i in range(steps + warm):
            if i == warm:
                _sync(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        rates[f"{impl}{run}"] = batch * steps / (time.perf_counter() - start)
    return {"kernel": (rates["triton0"], rates["triton2"]), "reference": rates["reference1"]}


# ----------------------------------------------------------------------------------------------- warm-up
def _compile_caches_on() -> None:
    """Inductor's FX graph cache and AOTAutograd's cache (on by default in recent torch; made sure of): the warm-up
    processes write them, the timed process reads them (compile_threads is not part of their keys)."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "fx_graph_cache"):
        inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config
        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass


def _worker_init(device_type: str) -> None:
    """Warm-up processes: Inductor compiles in-process (the parallelism is across these workers)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    _compile_caches_on()
    _wa()


def _warm_job(job: tuple) -> tuple[str, float, str]:
    """One warm-up job (in a worker): compile, run once, time nothing. Returns (job, seconds, error or "")."""
    kind, payload = job
    device = torch.device(payload["device"])
    t0 = time.perf_counter()
    wa = _wa()
    try:
        if kind in ("ours", "train_attn"):
            case, i = payload["case"], payload["config"]
            bias_dtype = torch.bfloat16 if kind == "train_attn" and device.type == "cuda" else torch.float32
            qkv, bias, ls, dout = make_inputs(case, payload["dtype"], device, bias_dtype)
            wa.FORCE_CONFIG = i
            wa.clear_autotune_cache()
            out = wa.window_attention(qkv, case.heads, (case.window,) * 2, case.shift, bias, ls, impl="triton")
            single = case.window ** 2 <= wa._SINGLE_TILE_MAX
            if i < len((wa._bwd_fused if single else wa._bwd_dq).configs):
                out.backward(dout)
        elif kind == "compiled":
            case = payload["case"]
            qkv, bias, ls, dout = make_inputs(case, payload["dtype"], device)
            torch._dynamo.reset()
            fn = attention_fn("compiled")
            fn(qkv, case.heads, (case.window,) * 2, case.shift, bias, ls).backward(dout)
        _sync(device)
        err = ""
    except Exception as e:  # reported, not fatal: the timed phase compiles what is missing
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return f"{kind} {payload.get('desc', '')}", time.perf_counter() - t0, err


def warm_jobs(cases, methods, train_calls, device, dtype) -> list[tuple]:
    """Longest first (torch.compile of a shape ~10-30 s; one kernel configuration ~1-8 s)."""
    wa = _wa()
    n_configs = 1 if wa.INTERPRET else max(len(t.configs) for t in wa.AUTOTUNERS)
    jobs = []
    if "compiled" in methods:
        jobs += [("compiled", dict(case=c, dtype=dtype, device=str(device), desc=c.label)) for c in cases]
    for i in range(n_configs):
        if "ours" in methods:
            jobs += [("ours", dict(case=c, config=i, dtype=dtype, device=str(device), desc=f"{c.label} config {i}"))
                     for c in cases]
        for B, H, C, heads, w, s in train_calls:
            case = Case(f"train {H}x{H} C={C}", B, H, C, heads, w, True)
            case = _with_shift(case, s)
            jobs.append(("train_attn", dict(case=case, config=i, dtype=dtype, device=str(device),
                                            desc=f"{case.label} shift {s} config {i}")))
    return jobs


@dataclass(frozen=True)
class _ShiftedCase(Case):
    shift_value: int = 0

    @property
    def shift(self) -> tuple[int, int]:
        return self.shift_value, self.shift_value


def _with_shift(case: Case, shift: int) -> Case:
    return _ShiftedCase(case.name, case.B, case.H, case.C, case.heads, case.window, case.v2, shift)


def warm_up(jobs, workers: int, deadline_s: float, device) -> None:
    if not jobs or workers <= 0:
        return
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                  initargs=(device.type,))
    futures = [pool.submit(_warm_job, j) for j in jobs]
    done, failed = 0, []
    try:
        for fut in cf.as_completed(futures, timeout=deadline_s):
            try:
                desc, secs, err = fut.result()
            except Exception as e:  # a worker died (e.g. BrokenProcessPool): the timed phase compiles the rest
                print(f"[warm-up] stopped: {type(e).__name__}: {e}", flush=True)
                break
            done += 1
            if err:
                failed.append(f"{desc}: {err}")
            if done % 10 == 0 or done == len(jobs):
                print(f"[warm-up] {done}/{len(jobs)} jobs, {time.perf_counter() - t0:.0f} s", flush=True)
    except cf.TimeoutError:
        print(f"[warm-up] deadline: {done}/{len(jobs)} jobs done in {deadline_s:.0f} s; the timed phase "
              f"compiles the rest", flush=True)
    finally:
        for fut in futures:
            fut.cancel()
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # stop compiles still running (cache writes are atomic renames)
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    for f in failed[:5]:
        print(f"[warm-up] failed: {f}", flush=True)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and model: prove the code paths (CPU)")
    p.add_argument("--full", action="store_true", help="also the later-stage shapes")
    p.add_argument("--out", default="", help="results file (markdown), rewritten and appended to row by row")
    p.add_argument("--variants", nargs="+", choices=["v2", "v1"], default=["v2", "v1"])
    p.add_argument("--windows", type=int, nargs="+", default=None, help="only these window sizes")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-train", action="store_true", help="skip the SwinV2 training step")
    p.add_argument("--train-batch", type=int, default=None, help="default 64 (GPU), 2 (smoke)")
    p.add_argument("--train-steps", type=int, default=None, help="timed steps per run, default 10 (GPU), 1")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no row starts after this many seconds from the start (default 150 GPU, 900 CPU)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="torch.compile time in the timed phase after which the compiled column is skipped "
                        "(default 40 GPU, 60 CPU)")
    p.add_argument("--warm-workers", type=int, default=None,
                   help="parallel compile warm-up processes (default: CPUs - 2, at most 14, on the GPU; 1 CPU)")
    p.add_argument("--warm-deadline-s", type=float, default=None, help="default 55 (GPU), 120 (CPU)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu":  # before the kernel module is imported (here and, inherited, in the workers)
        os.environ["TRITON_INTERPRET"] = "1"
    _wa()  # imported now: after TRITON_INTERPRET, before the workers are spawned
    _compile_caches_on()
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes bf16 wrongly
    budget = args.budget_s if args.budget_s is not None else (150.0 if gpu else 900.0)
    compile_budget = args.compile_budget_s if args.compile_budget_s is not None else (40.0 if gpu else 60.0)
    workers = args.warm_workers if args.warm_workers is not None else (
        max(1, min(14, (os.cpu_count() or 4) - 2)) if gpu else 1)
    warm_deadline = args.warm_deadline_s if args.warm_deadline_s is not None else (55.0 if gpu else 120.0)
    smoke = args.smoke or not gpu
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES + (FULL_EXTRA_SHAPES if args.full else [])
    if args.windows:
        shapes = [s for s in shapes if s[-1] in args.windows]
    cases = _cases(shapes, args.variants)
    train_batch = args.train_batch or (2 if smoke else 64)
    train_steps = args.train_steps or (1 if smoke else 10)
    train_calls = [] if args.no_train else train_attention_calls(smoke, train_batch)

    out_path = Path(args.out) if args.out else None
    results = Results(out_path)
    warm_up(warm_jobs(cases, args.methods, train_calls, device, dtype), workers, warm_deadline, device)
    warm_s = time.perf_counter() - start
    deadline = start + budget

    bw = copy_bandwidth(device)
    import triton
    results.write("# Window attention: ours vs torch.compile / SDPA / eager, and the SwinV2-B training step\n")
    results.write(f"Device: {device_name(device)}. Date: {datetime.date.today().isoformat()}. Commit: {git_commit()}. "
                  f"torch {torch.__version__}, triton {triton.__version__}.  ")
    results.write(f"Command: `python bench/window_attention_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
                  f" (compile warm-up {warm_s:.0f} s on {workers} workers).  ")
    results.write(f"Device-to-device copy, measured in this run: {bw / 1e9:.0f} GB/s "
                  f"({'1 GiB fp32' if gpu else '16 MiB fp32'}, read + write). Bytes floor: every tensor read or "
                  f"written once (`kernels.window_attention.bytes_moved`), at that bandwidth.  ")
    results.write(f"Inputs: {str(dtype).replace('torch.', '')} qkv, dout and output, fp32 bias and logit scale, "
                  f"shifted windows, head dim 32. Times: median ms ({'triton.testing.do_bench' if gpu else 'perf_counter, 2 runs: the interpreter, times mean nothing'}).\n")

    state = {"compile_s": 0.0}
    if not args.no_train:
        results.write("## Training step\n")
        results.write("| model | batch | precision | with the kernel (images/s, before / after) | with the reference "
                      "(images/s) | speed-up |\n|---|---|---|---|---|---|")
        name = "tiny SwinV2 @32 (smoke)" if smoke else "SwinV2-B/16 @256, AdamW"
        if time.perf_counter() > deadline:
            results.write(f"| {name} | {train_batch} | | skipped: --budget-s reached | | |")
        else:
            try:
                r = train_step_rates(device, train_batch, train_steps, smoke)
                k = statistics.mean(r["kernel"])
                results.write(f"| {name} | {train_batch} | {'bf16 autocast' if gpu else 'fp32'} | "
                              f"{r['kernel'][0]:.1f} / {r['kernel'][1]:.1f} | {r['reference']:.1f} | "
                              f"{k / r['reference']:.2f}x |")
            except Exception as e:
                results.write(f"| {name} | {train_batch} | | error: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]} | | |")
        if gpu:
            torch.cuda.empty_cache()
        results.write()

    results.write("## Attention\n")
    results.write(TABLE_HEAD)
    for case in cases:
        run_case(case, args.methods, device, dtype, bw, state, results, deadline, compile_budget)
    results.write(f"\nTotal {time.perf_counter() - start:.0f} s (warm-up {warm_s:.0f} s, torch.compile in the timed "
                  f"phase {state['compile_s']:.0f} s).")


if __name__ == "__main__":
    main()
