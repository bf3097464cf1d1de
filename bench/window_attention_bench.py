"""Window-attention benchmark: our Triton kernels vs timm's eager attention path vs the same under torch.compile
vs PyTorch SDPA with a materialised bias + shift mask.

GPU (the table that matters): SwinV2-T / SwinV2-B stage shapes, bf16, shifted windows (the block with the
seam mask), forward / backward / forward+backward time (triton.testing.do_bench, median), peak memory of one
forward+backward, achieved GB/s against the bytes floor of `kernels.window_attention.bytes_moved` (each tensor
read or written once), the floor's time at 3.0 TB/s (measured H100 HBM3, DESIGN.md), and ratios against the
torch.compile'd reference.

    python bench/window_attention_bench.py                      # GPU table if CUDA is available
    python bench/window_attention_bench.py --out results.md     # also write the markdown table

CPU (no CUDA): only small correctness-sized cases, the reference against our kernels under the Triton
interpreter, to prove the script and the kernels run; the times are the interpreter's and mean nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before the kernel module is imported: jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.window_attention import (LOGIT_SCALE_MAX, bytes_moved, flops,  # noqa: E402
                                      shift_mask, window_attention, window_attention_reference, window_merge,
                                      window_qkv)

HBM_TBPS = 3.0  # measured H100 HBM3 bandwidth (DESIGN.md performance anchors)
METHODS = ("ours", "compiled", "eager", "sdpa")

# (model, image px, window, stage, B, H=W of the stage map, C, heads): SwinV2 stage shapes (patch 4, d = 32).
# The window is clamped to the map as timm does (the last stage of window16_256 and window24_384).
GPU_CASES = [
    ("SwinV2-T w8", 256, 8, 1, 64, 64, 96, 3),
    ("SwinV2-T w8", 256, 8, 2, 64, 32, 192, 6),
    ("SwinV2-T w8", 256, 8, 3, 64, 16, 384, 12),
    ("SwinV2-T w16", 256, 16, 1, 64, 64, 96, 3),
    ("SwinV2-T w16", 256, 16, 3, 64, 16, 384, 12),
    ("SwinV2-B w8", 256, 8, 1, 64, 64, 128, 4),
    ("SwinV2-B w16", 256, 16, 2, 64, 32, 256, 8),
    ("SwinV2-B w24", 384, 24, 1, 16, 96, 128, 4),
    ("SwinV2-B w24", 384, 24, 2, 16, 48, 256, 8),
    ("SwinV2-B w12 (w24 stage 4)", 384, 12, 4, 16, 12, 1024, 32),
]
CPU_CASES = [  # (name, B, H, W, C, heads, window, shift)
    ("7x7 shifted", 1, 14, 21, 64, 2, 7, 3),
    ("8x8 shifted", 1, 16, 24, 64, 2, 8, 4),
]


def make_inputs(B, H, W, C, heads, window, dtype, device, v2=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = window * window
    qkv = torch.randn(B, H, W, 3 * C, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    if v2:
        bias = (16 * torch.sigmoid(torch.randn(heads, N, N, generator=g))).to(device).requires_grad_(True)
        ls = torch.full((heads, 1, 1), math.log(10), device=device).requires_grad_(True)
    else:
        bias = torch.randn(heads, N, N, generator=g).to(device).requires_grad_(True)
        ls = None
    dout = torch.randn(B, H, W, C, generator=g).to(device=device, dtype=dtype)
    return qkv, bias, ls, dout


def sdpa_attention(qkv, num_heads, window_size, shift_size, bias, logit_scale=None):
    """Roll + partition in torch, then F.scaled_dot_product_attention with the bias and shift mask materialised
    as one (B*nW, heads, N, N) additive mask (V2: normalised q, k and the per-head scale folded into q)."""
    B, H, W = qkv.shape[:3]
    q, k, v = window_qkv(qkv, num_heads, window_size, shift_size)     # B, nW, heads, N, d
    nW, N, d = q.shape[1], q.shape[3], q.shape[4]
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))                     # B*nW, heads, N, d (views)
    if logit_scale is None:
        scale = d ** -0.5
    else:
        q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().to(q.dtype)
        k = F.normalize(k, dim=-1)
        scale = 1.0
    mask = bias.to(q.dtype)[None, None]                               # 1, 1, heads, N, N
    if any(shift_size):
        mask = mask + shift_mask(H, W, window_size, shift_size, qkv.device, q.dtype)[None, :, None]
    mask = mask.expand(B, nW, num_heads, N, N).reshape(B * nW, num_heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = window_merge(out.view(B, nW, num_heads, N, d), window_size, shift_size, H, W)
    return out


def attention_fn(method: str):
    if method == "ours":
        return lambda *a: window_attention(*a, impl="triton")
    if method == "eager":
        return window_attention_reference
    if method == "compiled":
        return torch.compile(window_attention_reference, dynamic=False)
    if method == "sdpa":
        return sdpa_attention
    raise ValueError(method)


# ----------------------------------------------------------------------------------------------- GPU
def run_gpu(cases, methods, v2: bool, dtype=torch.bfloat16) -> list[dict]:
    import triton.testing

    rows = []
    for model, px, window, stage, B, Hs, C, heads in cases:
        ws, shift = (window, window), (window // 2, window // 2)
        elem = torch.finfo(dtype).bits // 8
        floor = {p: bytes_moved(B, Hs, Hs, C, heads, ws, elem, 4, pass_=p) for p in ("fwd", "bwd", "fwd+bwd")}
        for method in methods:
            row = {"model": model, "px": px, "stage": stage, "B": B, "map": Hs, "C": C, "heads": heads,
                   "window": window, "method": method, "bytes": floor,
                   "flop": {p: flops(B, Hs, Hs, C, heads, ws, p) for p in ("fwd", "bwd", "fwd+bwd")}}
            try:
                qkv, bias, ls, dout = make_inputs(B, Hs, Hs, C, heads, window, dtype, "cuda", v2)
                params = [t for t in (qkv, bias, ls) if t is not None]
                fn = attention_fn(method)
                call = lambda: fn(qkv, heads, ws, shift, bias, ls)
                for _ in range(2):  # compile / autotune outside the timed region
                    call().backward(dout)
                torch.cuda.synchronize()
                for t in params:
                    t.grad = None
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call().backward(dout)
                torch.cuda.synchronize()
                row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["fwd_ms"] = triton.testing.do_bench(call, return_mode="median")  # training forward

                def fwd_bwd():
                    call().backward(dout)

                row["total_ms"] = triton.testing.do_bench(fwd_bwd, grad_to_none=params, return_mode="median")
                out = call()
                try:
                    row["bwd_ms"] = triton.testing.do_bench(lambda: out.backward(dout, retain_graph=True),
                                                            grad_to_none=params, return_mode="median")
                except RuntimeError:  # a backward that cannot be replayed: the difference instead
                    row["bwd_ms"] = row["total_ms"] - row["fwd_ms"]
                out = None  # frees the graph before the next case
            except torch.OutOfMemoryError:
                row["oom"] = True
            torch.cuda.empty_cache()
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    if r.get("oom"):
        return f"{r['model']} stage {r['stage']} {r['method']}: OOM"
    return (f"{r['model']} stage {r['stage']} {r['method']}: fwd {r['fwd_ms']:.3f} ms, bwd {r['bwd_ms']:.3f} ms, "
            f"fwd+bwd {r['total_ms']:.3f} ms, peak {r['peak_mib']:.0f} MiB")


def gpu_table(rows: list[dict], device: str, v2: bool) -> str:
    floor_ms = lambda b: b / (HBM_TBPS * 1e12) * 1e3
    gbps = lambda b, ms: b / (ms * 1e-3) / 1e9
    lines = [f"Device: {device}. bf16, {'V2 (cosine, logit scale at init)' if v2 else 'V1'}, shifted windows, "
             f"d = 32. Each cell: ms (bytes floor in ms at {HBM_TBPS} TB/s, achieved GB/s of that floor, "
             f"matmul TFLOP/s); 'x compiled' = compiled time / this time.", "",
             "| case | B | map | C | win | method | fwd | bwd | fwd+bwd | x compiled fwd / fwd+bwd | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        case = f"{r['model']} s{r['stage']} @{r['px']}"
        head = f"| {case} | {r['B']} | {r['map']} | {r['C']} | {r['window']} | {r['method']} |"
        if r.get("oom"):
            lines.append(f"{head} OOM | | | | |")
            continue
        ref = next((o for o in rows if o["method"] == "compiled" and o["model"] == r["model"]
                    and o["stage"] == r["stage"] and not o.get("oom")), None)
        cells = []
        for key, p in (("fwd_ms", "fwd"), ("bwd_ms", "bwd"), ("total_ms", "fwd+bwd")):
            b = r["bytes"][p]
            tflops = r["flop"][p] / (r[key] * 1e-3) / 1e12
            cells.append(f"{r[key]:.3f} ({floor_ms(b):.3f}, {gbps(b, r[key]):.0f}, {tflops:.1f})")
        ratio = (f"{ref['fwd_ms'] / r['fwd_ms']:.2f} / {ref['total_ms'] / r['total_ms']:.2f}" if ref else "n/a")
        lines.append(f"{head} {' | '.join(cells)} | {ratio} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CPU
def run_cpu(v2: bool) -> list[dict]:
    rows = []
    for name, B, H, W, C, heads, window, sh in CPU_CASES:
        ws, shift = (window, window), (sh, sh)
        qkv, bias, ls, dout = make_inputs(B, H, W, C, heads, window, torch.float32, "cpu", v2)
        ref64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in (qkv, bias, ls)]
        want = window_attention_reference(ref64[0], heads, ws, shift, ref64[1], ref64[2])
        want.backward(dout.double())
        for method in ("ours", "eager"):
            for t in (qkv, bias, ls):
                if t is not None:
                    t.grad = None
            fn = attention_fn(method)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(qkv, heads, ws, shift, bias, ls)
            t1 = time.perf_counter()
            out = fn(qkv, heads, ws, shift, bias, ls)
            out.backward(dout)
            t2 = time.perf_counter()
            err = max((out.double() - want).abs().max().item(),
                      (qkv.grad.double() - ref64[0].grad).abs().max().item(),
                      (bias.grad.double() - ref64[1].grad).abs().max().item())
            rows.append({"case": name, "B": B, "map": f"{H}x{W}", "C": C, "heads": heads, "method": method,
                         "fwd_s": t1 - t0, "total_s": t2 - t1, "max_err": err})
            print(rows[-1], flush=True)
    return rows


def cpu_table(rows: list[dict]) -> str:
    lines = ["CPU, fp32: ours runs under TRITON_INTERPRET=1 (times are the interpreter's, not a measurement). "
             "The GPU table needs a CUDA GPU.", "",
             "| case | B | map | C | heads | method | fwd (s) | fwd+bwd (s) | "
             "max abs err vs float64 (out, dqkv, dbias) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['B']} | {r['map']} | {r['C']} | {r['heads']} | {r['method']} | "
                     f"{r['fwd_s']:.2f} | {r['total_s']:.2f} | {r['max_err']:.2e} |")
    return "\n".join(lines)


def swinv2_training_step(batch: int = 32, steps: int = 20) -> str:
    """SwinV2-B (window 16, 256 px) training steps in bf16 autocast, AdamW: images/s with the Triton kernel and
    with the PyTorch reference, measured back to back in this process (GPU only)."""
    from pipeline.models.swinv2 import create_swinv2

    model = create_swinv2("swinv2_base_window16_256").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 256, 256, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    rates = {}
    for impl in ("triton", "reference", "triton"):  # the kernel twice: warm caches cannot favour it unfairly
        model.set_attn_impl(impl)
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        rates[impl] = batch * steps / (time.perf_counter() - start)
    return (f"SwinV2-B/16 @256, batch {batch}, bf16 autocast, AdamW: {rates['triton']:.1f} images/s with the "
            f"kernel vs {rates['reference']:.1f} with the reference ({rates['triton'] / rates['reference']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="write the markdown table here (default: print only)")
    p.add_argument("--variant", choices=["v2", "v1"], default="v2")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--cases", type=int, nargs="+", default=None, help="indices into the GPU case list")
    args = p.parse_args()
    v2 = args.variant == "v2"
    if torch.cuda.is_available():
        cases = [GPU_CASES[i] for i in args.cases] if args.cases else GPU_CASES
        rows = run_gpu(cases, args.methods, v2)
        text = gpu_table(rows, torch.cuda.get_device_name(), v2) + "\n\n" + swinv2_training_step()
    else:
        print("No CUDA device: running the small CPU cases only (reference vs interpreter); "
              "the GPU table needs a GPU.", flush=True)
        text = cpu_table(run_cpu(v2))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
