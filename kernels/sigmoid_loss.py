"""The SigLIP sigmoid contrastive loss without the n x m logit matrix.

x (n, d) image and y (m, d) text embeddings, L2-normalised, m >= n; positives at (i, i) for i < n;
t = exp(t'), bias b, z = t * x y^T + b, label +1 on positives and -1 elsewhere:

    L = -(1/n) * sum_ij log_sigmoid(label_ij * z_ij)

With g_ij = (sigmoid(z_ij) - [positive]) / n:  dX = t G Y,  dY = t G^T X,  dt' = sum g_ij (z_ij - b),  db = sum g_ij.

Three implementations of one contract, `loss_and_grads(x, y, t_prime, bias, has_positives)`:
- `reference`: the formula above with the full logit matrix (tests only).
- `tiled`: PyTorch over small (rows x columns) tiles; memory is linear in n + m. The CPU path.
- `blocks`: the GPU path, at the FLOP floor of three GEMMs. For each block of R rows: the logits S = X_R Y^T
  (cuBLAS, fp32 accumulation, written in x's dtype as PyTorch's own logits are), one Triton elementwise pass that
  turns S in place into the coefficients t (sigmoid(z) - [pos]) and per-row partial sums of the loss, dt' and db,
  then dX_R = G Y and dY += G^T X_R (cuBLAS, dY accumulated in fp32). R is sized so that one block's logits stay
  under BLOCK_BYTES. A fused single pass in
  the style of FlashAttention would recompute the logits for dY (and at d = 768 its accumulators do not fit in
  registers); chunking by rows does each GEMM once. Sums run in a fixed order: results are deterministic.
  Under TRITON_INTERPRET=1 the same path runs on the CPU (fp32 / fp16) for the tests.

The gradients are computed in the forward pass (the loss is a scalar: backward only scales them), which
saves a second pass over the logits; `torch.no_grad()` callers skip the gradient work. `sigmoid_loss` is the
one entry point models call; it picks the block path on a GPU and the tiled path elsewhere.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

try:  # Triton is optional at import time: CPU-only installs use the tiled path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

Impl = Literal["auto", "blocks", "tiled", "reference"]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- reference
def sigmoid_loss_reference(x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                           has_positives: bool = True) -> torch.Tensor:
    """The loss by its definition, with autograd; computed in float32 (float64 if the inputs are)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m = x.shape[0], y.shape[0]
    z = t_prime.to(dtype).exp() * (x.to(dtype) @ y.to(dtype).T) + bias.to(dtype)
    labels = -torch.ones(n, m, dtype=dtype, device=x.device)
    if has_positives:
        labels[torch.arange(n), torch.arange(n)] = 1.0
    return -F.logsigmoid(labels * z).sum() / n


# ----------------------------------------------------------------------------------------------- tiled
def _tiled_loss_and_grads(x, y, t_prime, bias, has_positives: bool, need_grads: bool, tile: int = 512):
    n, m = x.shape[0], y.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = t_prime.to(acc).exp()
    b = bias.to(acc)
    loss = torch.zeros((), dtype=acc, device=x.device)
    dt = torch.zeros((), dtype=acc, device=x.device)
    db = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_grads else None
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if need_grads else None
    for i0 in range(0, n, tile):
        xi = x[i0:i0 + tile].to(acc)
        for j0 in range(0, m, tile):
            yj = y[j0:j0 + tile].to(acc)
            s = xi @ yj.T
            z = t * s + b
            pos = torch.zeros_like(z, dtype=torch.bool)
            if has_positives:  # the diagonal i == j crosses this tile where the index ranges overlap
                lo, hi = max(i0, j0), min(i0 + xi.shape[0], j0 + yj.shape[0], n)
                if lo < hi:
                    r = torch.arange(lo, hi, device=x.device)
                    pos[r - i0, r - j0] = True
            loss -= F.logsigmoid(torch.where(pos, z, -z)).sum()
            if need_grads:
                g = (torch.sigmoid(z) - pos.to(acc)) / n
                dt += (g * s).sum() * t
                db += g.sum()
                dx[i0:i0 + tile] += g @ yj
                dy[j0:j0 + tile] += g.T @ xi
    if need_grads:
        dx *= t
        dy *= t
    return loss / n, dx, dy, dt, db


# ----------------------------------------------------------------------------------------------- blocks
# The GPU path does the floor's FLOPs: per block of R rows, three GEMMs on cuBLAS and one fused elementwise pass.
# The logits of a block are kept (in x's dtype) between its GEMM and the pass, which writes the coefficients over
# them; R is sized so that the block fits a fixed budget, which bounds the extra memory at any n: with the fp32 dY
# accumulator (two of them while cuBLAS adds a block into a new one) and the gradients, about 1.3 GiB at
# n = m = 65,536, d = 768 in bf16. In place, the same budget holds twice the rows of a separate coefficient
# buffer: half as many blocks, so half the fp32 dY traffic (each block reads and writes all of dY).
BLOCK_BYTES = 640 * 2**20  # the logits (then coefficients) of one row block
ROW_ALIGN = 128  # R is a multiple of this (cuBLAS tiles), unless the whole of x is one block

if triton is not None:

    @triton.jit
    def _coefficients_kernel(s_ptr, part_ptr, tp_ptr, b_ptr, row0, n, m, stride_s, n_chunks,
                             HAS_POS: tl.constexpr, NEED_GRADS: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row r of the block, column chunk c): from s = <x_i, y_j> (i = row0 + r) writes the gradient
        coefficients (sigmoid(z) - [positive]) * t over s (in place: each element is loaded, then stored, by the one
        program that owns it), and the chunk's partial sums of
        -log_sigmoid(label z), (sigmoid(z) - [positive]) * s and (sigmoid(z) - [positive]) to part[r, c]
        (summed later in a fixed order: deterministic)."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        i = row0 + r
        cols = c * BLOCK + tl.arange(0, BLOCK)
        valid = cols < m
        t = tl.exp(tl.load(tp_ptr).to(tl.float32))
        b = tl.load(b_ptr).to(tl.float32)
        s = tl.load(s_ptr + r.to(tl.int64) * stride_s + cols, mask=valid, other=0.0).to(tl.float32)
        z = t * s + b
        if HAS_POS:
            pos = (cols == i) & valid
        else:
            pos = cols < 0
        u = tl.where(pos, z, -z)
        e = tl.exp(-tl.abs(z))  # one exp serves both, and never overflows: |u| = |z|
        nll = tl.where(valid, tl.maximum(-u, 0.0) + tl.log(1.0 + e), 0.0)  # softplus(-u)
        inv = tl.fdiv(1.0, 1.0 + e)  # one fast reciprocal (1 + e is in [1, 2]: no range issue), not two divisions
        sig = tl.where(z >= 0, inv, e * inv)
        g = tl.where(valid, sig - pos.to(tl.float32), 0.0)
        if NEED_GRADS:
            # scaled by t, not t / n: |g t| <= 100 stays in fp16's normal range at any n; 1/n is applied after
            tl.store(s_ptr + r.to(tl.int64) * stride_s + cols, (g * t).to(s_ptr.dtype.element_ty), mask=valid)
        base = part_ptr + (r * n_chunks + c) * 3
        tl.store(base + 0, tl.sum(nll, axis=0))
        tl.store(base + 1, tl.sum(g * s, axis=0))
        tl.store(base + 2, tl.sum(g, axis=0))


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: fp16/bf16 inputs stay in their dtype on the GPU (cuBLAS accumulates in fp32
    and writes fp32)."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # the interpreter's CPU fp16 tests


def _accumulate_f32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (acc None: a @ b); on the GPU the addition is cuBLAS's beta = 1 epilogue."""
    if acc is None:
        return _mm_f32(a, b)
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def row_block(n: int, m: int, elem_bytes: int) -> int:
    """Rows per block: as many as keep the block's logits (in x's dtype, the coefficients written over them)
    within BLOCK_BYTES."""
    rows = BLOCK_BYTES // (m * elem_bytes)
    if rows >= n:
        return n
    return max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN)


def _chunk(m: int) -> int:
    """Columns per program: thousands, so that the three partial sums and their stores are amortised over
    enough elements (1024 per program ran at a third of the bandwidth on an H200)."""
    return min(4096 if not INTERPRET else 64, triton.next_power_of_2(m))


def _block_loss_and_grads(x, y, t_prime, bias, has_positives: bool, need_grads: bool):
    """Row blocks: S = X_R Y^T (cuBLAS), coefficients G (Triton), dX_R = G Y / n and dY += G^T X_R / n (cuBLAS)."""
    n, d = x.shape
    m = y.shape[0]
    x, y = x.contiguous(), y.contiguous()
    tp = t_prime.reshape(1).float().contiguous()
    b = bias.reshape(1).float().contiguous()
    rows = row_block(n, m, x.element_size())
    block = _chunk(m)
    n_chunks = triton.cdiv(m, block)
    sums = torch.zeros(3, dtype=torch.float32, device=x.device)  # loss, sum g s, sum g: unscaled
    dx = torch.empty_like(x) if need_grads else None
    dy = None
    for r0 in range(0, n, rows):
        xr = x[r0:r0 + rows]
        g = xr @ y.T  # the logits, in x's dtype as PyTorch's own bf16 logits (measured faster than fp32 at 64k)
        part = torch.empty(xr.shape[0], n_chunks, 3, dtype=torch.float32, device=x.device)
        _coefficients_kernel[(xr.shape[0], n_chunks)](  # turns g into the coefficients, in place
            g, part, tp, b, r0, n, m, g.stride(0), n_chunks,
            HAS_POS=has_positives, NEED_GRADS=need_grads, BLOCK=block, num_warps=8)
        sums += part.sum(dim=(0, 1))
        if need_grads:
            dx[r0:r0 + rows] = _mm_f32(g, y).mul_(1 / n)  # rounded to x's dtype once
            dy = _accumulate_f32(dy, g.T, xr)
    t = tp.exp().reshape(())
    loss, gs, gsum = (sums / n).unbind()
    if not need_grads:
        return loss, None, None, None, None
    return loss, dx, dy.mul_(1 / n), t * gs, gsum


# ----------------------------------------------------------------------------------------------- dispatch
def triton_available(x: torch.Tensor) -> bool:
    if triton is None:
        return False
    if x.is_cuda:
        return True
    return INTERPRET and x.dtype in (torch.float32, torch.float16)  # the interpreter has no bf16


def loss_and_grads(x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                   has_positives: bool = True, need_grads: bool = True, impl: Impl = "auto"):
    """(loss, dX, dY, dt', db) with fp32 accumulation (grads None when not needed). `has_positives=False`
    scores a block of negatives only (a remote text block in the ring)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"sigmoid_loss: x {tuple(x.shape)} and y {tuple(y.shape)} must be (n, d) and (m, d)")
    if has_positives and y.shape[0] < x.shape[0]:
        raise ValueError(f"sigmoid_loss: y has {y.shape[0]} rows, fewer than the {x.shape[0]} positives of x")
    if impl == "auto":
        impl = "blocks" if x.is_cuda and triton_available(x) else "tiled"
    if impl == "blocks":
        if not triton_available(x):
            raise ValueError("sigmoid_loss: impl='blocks' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 "
                             "with fp32 / fp16 on the CPU)")
        return _block_loss_and_grads(x, y, t_prime, bias, has_positives, need_grads)
    if impl == "tiled":
        return _tiled_loss_and_grads(x, y, t_prime, bias, has_positives, need_grads)
    raise ValueError(f"sigmoid_loss: unknown impl {impl!r}")


def grads_needed(*inputs: torch.Tensor) -> bool:
    """Whether the gradients must be made: an input requires them and autograd is recording. Asked before
    `Function.apply` (forward itself always runs with grad mode off, and `ctx.needs_input_grad` ignores it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def take_saved_grads(ctx) -> tuple[torch.Tensor, ...]:
    """The gradients computed in forward, handed out once: backward scales them in place and returns them, so
    they become .grad without a copy (peak memory = one set of gradients)."""
    if getattr(ctx, "grads_taken", False):
        raise RuntimeError("sigmoid_loss: backward through the same graph twice is not supported "
                           "(the gradients are computed in forward and handed out once)")
    ctx.grads_taken = True
    return ctx.saved_tensors


class SigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, t_prime, bias, impl: Impl = "auto", need: bool = True):
        loss, dx, dy, dt, db = loss_and_grads(x, y, t_prime, bias, True, need, impl)
        if need:
            ctx.save_for_backward(dx.to(x.dtype), dy.to(y.dtype), dt, db)
            ctx.shapes = (t_prime.shape, bias.shape, t_prime.dtype, bias.dtype)
        return loss.to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dx, dy, dt, db = take_saved_grads(ctx)
        tp_shape, b_shape, tp_dtype, b_dtype = ctx.shapes
        return (dx.mul_(grad.to(dx.dtype)), dy.mul_(grad.to(dy.dtype)), (dt * grad).reshape(tp_shape).to(tp_dtype),
                (db * grad).reshape(b_shape).to(b_dtype), None, None)


def sigmoid_loss(x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                 impl: Impl = "auto") -> torch.Tensor:
    """The 0-d SigLIP loss (mean over the n rows of x); differentiable in all four inputs."""
    if impl == "reference":
        return sigmoid_loss_reference(x, y, t_prime, bias)
    return SigmoidLoss.apply(x, y, t_prime, bias, impl, grads_needed(x, y, t_prime, bias))


def flops(n: int, m: int, d: int) -> float:
    """The floor: three n x m x d GEMMs (logits, dX, dY)."""
    return 3 * 2.0 * n * m * d


