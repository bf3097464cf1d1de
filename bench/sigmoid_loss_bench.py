"""Sigmoid-loss benchmark: ours vs open_clip's SigLipLoss (the eager n x n reference) vs our tiled path.

On a GPU: forward, backward and forward+backward time (triton.testing.do_bench, median) and peak memory for
n in {4k, 16k, 64k} x d in {768, 1152}, bf16, with the 3-GEMM FLOP floor at the measured H100 matmul rate.
On the CPU: peak memory (resident-set growth measured in a fresh process per case) and time at small n, fp32.

    python bench/sigmoid_loss_bench.py                 # CPU: n = 4096, 16384; d = 768
    python bench/sigmoid_loss_bench.py --device cuda   # the full GPU table
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

H100_MATMUL_TFLOPS = 795.0  # measured bf16 dense matmul rate (DESIGN.md performance anchors)
METHODS = ("ours", "tiled", "open_clip")


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

    impl = "auto" if method == "ours" else "tiled"
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


def run_gpu(sizes: list[int], dims: list[int]) -> list[dict]:
    import triton.testing

    rows = []
    for d in dims:
        for n in sizes:
            for method in METHODS:
                fn = _loss_fn(method)
                try:
                    x, y, scale, bias = _inputs(n, d, "cuda", torch.bfloat16)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    loss = fn(x, y, scale, bias)
                    loss.backward()
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    fwd = triton.testing.do_bench(lambda: fn(x, y, scale, bias), return_mode="median")

                    def fwd_bwd():
                        x.grad = y.grad = scale.grad = bias.grad = None
                        fn(x, y, scale, bias).backward()

                    total = triton.testing.do_bench(fwd_bwd, return_mode="median")
                    row = {"method": method, "n": n, "d": d, "loss": loss.item(), "fwd_ms": fwd,
                           "bwd_ms": total - fwd, "total_ms": total, "peak_mib": peak}
                except torch.OutOfMemoryError:
                    row = {"method": method, "n": n, "d": d, "oom": True}
                    torch.cuda.empty_cache()
                floor_ms = 3 * 2.0 * n * n * d / (H100_MATMUL_TFLOPS * 1e12) * 1e3
                row["floor_ms"] = floor_ms
                rows.append(row)
                print(json.dumps(row), flush=True)
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
        lines.append("| n | d | method | fwd (ms) | bwd (ms) | fwd+bwd (ms) | floor (ms) | peak (MiB) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("oom"):
                lines.append(f"| {r['n']} | {r['d']} | {r['method']} | OOM | | | {r['floor_ms']:.2f} | |")
            else:
                lines.append(f"| {r['n']} | {r['d']} | {r['method']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                             f"{r['total_ms']:.2f} | {r['floor_ms']:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--json", default="", help="also write the raw rows here")
    args = p.parse_args()
    if args.device == "cpu":
        rows = run_cpu(args.sizes or [4096, 16384], (args.dims or [768])[0])
    else:
        rows = run_gpu(args.sizes or [4096, 16384, 65536], args.dims or [768, 1152])
    print(table(rows, args.device))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
