"""Sigmoid-loss benchmark: ours vs open_clip's SigLipLoss (the eager n x n reference) vs our tiled path.

On a GPU: forward (with and without autograd), backward and forward+backward time (triton.testing.do_bench,
median) and peak memory for n in {4k, 16k, 64k} x d in {768, 1152}, bf16, with the 3-GEMM FLOP floor at the bf16
matmul rate measured in the same run. Rows are printed and appended to --out as they finish.
On the CPU: peak memory (resident-set growth measured in a fresh process per case) and time at small n, fp32.

    python bench/sigmoid_loss_bench.py                 # CPU: n = 4096, 16384; d = 768
    python bench/sigmoid_loss_bench.py --device cuda --out rows.jsonl   # the full GPU table
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("ours", "tiled", "open_clip")  # the CPU table
GPU_METHODS = ("ours", "open_clip", "tiled")


def _inputs(n: int, d: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype).requires_grad_(True)
    y = F.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype).requires_grad_(True)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return x, y, scale, bias


def _loss_fn(method: str):
    if method == "open_clip":
        from open_clip.loss import SigLipLoss

        loss = SigLipLoss()
        return lambda x, y, scale, bias: loss(x, y, scale, bias)
    from kernels.sigmoid_loss import sigmoid_loss

    impl = "tiled" if method == "tiled" else "auto"
    return lambda x, y, scale, bias: sigmoid_loss(x, y, scale.log(), bias, impl=impl)


def measure_cpu_case(method: str, n: int, d: int) -> dict:
    """Runs in the current process: peak RSS growth of one forward+backward, and its time."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    x, y, scale, bias = _inputs(n, d, "cpu", torch.float32)
    fn = _loss_fn(method)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    t0 = time.perf_counter()
    loss = fn(x, y, scale, bias)
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is a high-water mark; growth is measured from the current RSS (inputs already allocated)
    growth_kb = max(0, peak - max(rss_now, 0)) if peak > before else 0
    return {"method": method, "n": n, "d": d, "loss": loss.item(), "peak_mib": growth_kb / 1024,
            "seconds": elapsed, "grad_x_norm": x.grad.norm().item(), "grad_bias": bias.grad.item()}


def cpu_case_in_subprocess(method: str, n: int, d: int) -> dict:
    """A fresh process per case, so one method's freed memory cannot hide another's peak."""
    code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r});"
            f"from sigmoid_loss_bench import measure_cpu_case;"
            f"print(json.dumps(measure_cpu_case({method!r}, {n}, {d})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cpu(sizes: list[int], d: int) -> list[dict]:
    rows = []
    for n in sizes:
        for method in METHODS:
            rows.append(cpu_case_in_subprocess(method, n, d))
    return rows


GPU_CAPS = {"tiled": 4096}  # largest n per method on the GPU: the tiled path is the CPU's, slow at scale


def matmul_tflops(device: str = "cuda") -> float:
    """bf16 dense matmul rate measured now (8192^3, median): the floor's denominator."""
    import triton.testing

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def gpu_case(method: str, n: int, d: int, tflops: float) -> dict:
    import triton.testing

    fn = _loss_fn(method)
    row = {"method": method, "n": n, "d": d, "floor_ms": 3 * 2.0 * n * n * d / (tflops * 1e12) * 1e3}
    try:
        x, y, scale, bias = _inputs(n, d, "cuda", torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(x, y, scale, bias)
        loss.backward()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20  # x.grad and y.grad included
        row["loss"] = loss.item()

        def fwd_bwd():
            x.grad = y.grad = scale.grad = bias.grad = None
            fn(x, y, scale, bias).backward()

        with torch.no_grad():  # the loss alone, as an evaluation pass computes it
            row["fwd_nograd_ms"] = triton.testing.do_bench(lambda: fn(x, y, scale, bias), return_mode="median")
        row["fwd_ms"] = triton.testing.do_bench(lambda: fn(x, y, scale, bias), return_mode="median")
        row["total_ms"] = triton.testing.do_bench(fwd_bwd, return_mode="median")
        row["bwd_ms"] = row["total_ms"] - row["fwd_ms"]
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        torch.cuda.empty_cache()
    return row


def run_gpu(sizes: list[int], dims: list[int], methods: list[str], out: Path | None) -> list[dict]:
    """Row by row: each finished case is printed and appended to `out` (JSON lines) at once, so a timeout
    loses only the case that was running."""
    tflops = matmul_tflops()
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "matmul_tflops": round(tflops, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(header), flush=True)
    if out:
        out.write_text(json.dumps(header) + "\n")
    rows = []
    for d in dims:
        for n in sizes:
            for method in methods:
                if n > GPU_CAPS.get(method, n):
                    continue
                row = gpu_case(method, n, d, tflops)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if out:
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = []
    if device == "cpu":
        lines.append("| n | d | method | loss | peak memory (MiB) | vs open_clip | fwd+bwd (s) |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(o for o in rows if o["method"] == "open_clip" and o["n"] == r["n"] and o["d"] == r["d"])
            ratio = ref["peak_mib"] / max(r["peak_mib"], 1e-9)
            lines.append(f"| {r['n']} | {r['d']} | {r['method']} | {r['loss']:.6f} | {r['peak_mib']:.1f} | "
                         f"{ratio:.1f}x less | {r['seconds']:.2f} |")
    else:
        lines.append("| n | d | method | fwd+bwd (ms) | vs open_clip | fwd (ms) | bwd (ms) | loss only, no grad (ms) | "
                     "3-GEMM floor (ms) | peak (MiB) | loss |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("oom"):
                lines.append(f"| {r['n']} | {r['d']} | {r['method']} | OOM | | | | | {r['floor_ms']:.2f} | | |")
                continue
            ref = next((o for o in rows if o["method"] == "open_clip" and o["n"] == r["n"] and o["d"] == r["d"]
                        and not o.get("oom")), None)
            ratio = f"{ref['total_ms'] / r['total_ms']:.2f}x" if ref else "-"
            lines.append(f"| {r['n']} | {r['d']} | {r['method']} | {r['total_ms']:.2f} | {ratio} | {r['fwd_ms']:.2f} | "
                         f"{r['bwd_ms']:.2f} | {r['fwd_nograd_ms']:.2f} | {r['floor_ms']:.2f} | {r['peak_mib']:.0f} | "
                         f"{r['loss']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=GPU_METHODS, help="GPU methods (default all)")
    p.add_argument("--out", type=Path, default=None, help="GPU: append each row here as a JSON line when it finishes")
    p.add_argument("--json", default="", help="also write the raw rows here")
    args = p.parse_args()
    if args.device == "cpu":
        rows = run_cpu(args.sizes or [4096, 16384], (args.dims or [768])[0])
    else:
        rows = run_gpu(args.sizes or [4096, 16384, 65536], args.dims or [768, 1152], args.methods or list(GPU_METHODS),
                       args.out)
    print(table(rows, args.device))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
