"""The SigLIP sigmoid contrastive loss without the n x m logit matrix.

x (n, d) image and y (m, d) text embeddings, L2-normalised, m >= n; positives at (i, i) for i < n;
t = exp(t'), bias b, z = t * x y^T + b, label +1 on positives and -1 elsewhere:

    L = -(1/n) * sum_ij log_sigmoid(label_ij * z_ij)

With g_ij = (sigmoid(z_ij) - [positive]) / n:  dX = t G Y,  dY = t G^T X,  dt' = sum g_ij (z_ij - b),  db = sum g_ij.

Three implementations of one contract, `loss_and_grads(x, y, t_prime, bias, has_positives)`:
- `reference`: the formula above with the full logit matrix (tests only).
- `tiled`: PyTorch over (rows x columns) tiles; memory is linear in n + m. Used on the CPU and as fallback.
- `triton`: two kernels that never hold more than one logit tile per program. The first walks the columns for a
  block of rows (loss, dX, dt', db), the second walks the rows for a block of columns (dY); both recompute the
  tile's logits instead of storing them, and sum in a fixed order, so results are deterministic.

The gradients are computed in the forward pass (the loss is a scalar: backward only scales them), which
saves a second pass over the logits; `torch.no_grad()` callers skip the gradient work. `sigmoid_loss` is the
one entry point models call; it picks Triton on a GPU and the tiled path elsewhere.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

try:  # Triton is optional at import time: CPU-only installs fall back to the tiled path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

Impl = Literal["auto", "triton", "tiled", "reference"]
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


# ----------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _logit_tile(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """s = x[rows] . y[cols]^T over the full embedding dimension, fp32 accumulation."""
        s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < d),
                         other=0.0)
            yt = tl.load(y_ptr + cols[:, None] * stride_y + ks[None, :], mask=(cols[:, None] < m) & (ks[None, :] < d),
                         other=0.0)
            if IEEE:
                s += tl.dot(xt, tl.trans(yt), input_precision="ieee")
            else:
                s += tl.dot(xt, tl.trans(yt))
        return s

    @triton.jit
    def _grad_tile(s, rows, cols, n, m, t, b, HAS_POS: tl.constexpr):
        """(sigmoid(z) - [positive], -log_sigmoid(label z)) of one tile, zero outside the matrix. The 1/n of g
        is applied once at the end: g itself is in [-1, 1], safe to round to fp16/bf16 for the gradient dots."""
        z = t * s + b
        valid = (rows[:, None] < n) & (cols[None, :] < m)
        if HAS_POS:
            pos = (rows[:, None] == cols[None, :]) & valid
        else:
            pos = tl.zeros_like(valid)
        u = tl.where(pos, z, -z)
        nll = tl.maximum(-u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))  # softplus(-u), stable
        g = tl.where(valid, 1.0 / (1.0 + tl.exp(-z)) - pos.to(tl.float32), 0.0)
        return g, tl.where(valid, nll, 0.0)

    @triton.jit
    def _rows_kernel(x_ptr, y_ptr, dx_ptr, part_ptr, tp_ptr, b_ptr, n, m, d, stride_x, stride_y, stride_dx,
                     HAS_POS: tl.constexpr, NEED_GRADS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (row block, d chunk): dX[rows, chunk] = t sum_j G Y; chunk 0 also writes the row block's
        partial loss, dt' and db."""
        pid_n, pid_d = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        t = tl.exp(tl.load(tp_ptr).to(tl.float32))
        b = tl.load(b_ptr).to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        loss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j0 in range(0, m, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            s = _logit_tile(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, BLOCK_N, BLOCK_M, BLOCK_K, IEEE)
            g, nll = _grad_tile(s, rows, cols, n, m, t, b, HAS_POS)
            loss += tl.sum(nll, axis=1)
            if NEED_GRADS:
                dt += tl.sum(g * s, axis=1) * t
                db += tl.sum(g, axis=1)
                yc = tl.load(y_ptr + cols[:, None] * stride_y + dcols[None, :],
                             mask=(cols[:, None] < m) & (dcols[None, :] < d), other=0.0)
                if IEEE:
                    acc += tl.dot(g, yc.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(g.to(yc.dtype), yc)
        if NEED_GRADS:
            tl.store(dx_ptr + rows[:, None] * stride_dx + dcols[None, :], acc * (t / n),
                     mask=(rows[:, None] < n) & (dcols[None, :] < d))
        if pid_d == 0:
            tl.store(part_ptr + pid_n * 3 + 0, tl.sum(loss, axis=0))
            tl.store(part_ptr + pid_n * 3 + 1, tl.sum(dt, axis=0))
            tl.store(part_ptr + pid_n * 3 + 2, tl.sum(db, axis=0))

    @triton.jit
    def _cols_kernel(x_ptr, y_ptr, dy_ptr, tp_ptr, b_ptr, n, m, d, stride_x, stride_y, stride_dy,
                     HAS_POS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (column block, d chunk): dY[cols, chunk] = t sum_i G^T X."""
        pid_m, pid_d = tl.program_id(0), tl.program_id(1)
        cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        t = tl.exp(tl.load(tp_ptr).to(tl.float32))
        b = tl.load(b_ptr).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for i0 in range(0, n, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            s = _logit_tile(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, BLOCK_N, BLOCK_M, BLOCK_K, IEEE)
            g, _ = _grad_tile(s, rows, cols, n, m, t, b, HAS_POS)
            xr = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :],
                         mask=(rows[:, None] < n) & (dcols[None, :] < d), other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(g), xr.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g).to(xr.dtype), xr)
        tl.store(dy_ptr + cols[:, None] * stride_dy + dcols[None, :], acc * (t / n),
                 mask=(cols[:, None] < m) & (dcols[None, :] < d))


def _triton_blocks(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes. One configuration under the interpreter; on a GPU the embedding dimension is split into
    chunks of at most 128 so the dX / dY accumulators stay in registers."""
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_M=32, BLOCK_K=min(64, block_d), BLOCK_D=block_d)
    wide = dtype != torch.float32
    return dict(BLOCK_N=64, BLOCK_M=64 if wide else 32, BLOCK_K=64 if wide else 32, BLOCK_D=block_d,
                num_warps=8 if wide else 4, num_stages=2)


def _triton_loss_and_grads(x, y, t_prime, bias, has_positives: bool, need_grads: bool):
    n, d = x.shape
    m = y.shape[0]
    x, y = x.contiguous(), y.contiguous()
    tp = t_prime.reshape(1).float().contiguous()
    b = bias.reshape(1).float().contiguous()
    cfg = _triton_blocks(d, x.dtype)
    ieee = x.dtype == torch.float32
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    d_blocks = triton.cdiv(d, cfg["BLOCK_D"])
    partials = torch.empty(n_blocks, 3, dtype=torch.float32, device=x.device)
    dx = torch.empty(n, d, dtype=torch.float32, device=x.device) if need_grads else partials
    _rows_kernel[(n_blocks, d_blocks if need_grads else 1)](
        x, y, dx, partials, tp, b, n, m, d, x.stride(0), y.stride(0), dx.stride(0) if need_grads else 0,
        HAS_POS=has_positives, NEED_GRADS=need_grads, IEEE=ieee, **cfg)
    loss, dt, db = (partials.sum(0) / n).unbind()  # partials are sums of unscaled terms
    if not need_grads:
        return loss, None, None, None, None
    dy = torch.empty(m, d, dtype=torch.float32, device=x.device)
    _cols_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), d_blocks)](
        x, y, dy, tp, b, n, m, d, x.stride(0), y.stride(0), dy.stride(0), HAS_POS=has_positives, IEEE=ieee, **cfg)
    return loss, dx, dy, dt, db


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
        impl = "triton" if x.is_cuda and triton_available(x) else "tiled"
    if impl == "triton":
        return _triton_loss_and_grads(x, y, t_prime, bias, has_positives, need_grads)
    if impl == "tiled":
        return _tiled_loss_and_grads(x, y, t_prime, bias, has_positives, need_grads)
    raise ValueError(f"sigmoid_loss: unknown impl {impl!r}")


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
    def forward(ctx, x, y, t_prime, bias, impl: Impl = "auto"):
        need = any(ctx.needs_input_grad[:4])
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
                (db * grad).reshape(b_shape).to(b_dtype), None)


def sigmoid_loss(x: torch.Tensor, y: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                 impl: Impl = "auto") -> torch.Tensor:
    """The 0-d SigLIP loss (mean over the n rows of x); differentiable in all four inputs."""
    if impl == "reference":
        return sigmoid_loss_reference(x, y, t_prime, bias)
    return SigmoidLoss.apply(x, y, t_prime, bias, impl)


def flops(n: int, m: int, d: int) -> float:
    """The floor: three n x m x d GEMMs (logits, dX, dY)."""
    return 3 * 2.0 * n * m * d


