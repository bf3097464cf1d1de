"""Fused (shifted-)window attention for Swin (V1) and SwinV2, reading and writing the image layout directly.

Contract, shared by every implementation of `window_attention(qkv, ...)`:

    qkv          (B, H, W, 3*C)  the per-token qkv projection of the feature map (C = heads * d). The qkv
                                 linear is per token, so applying it before the window partition (as here) or
                                 after it (as timm does) is the same computation. H % Mh == 0 and W % Mw == 0.
    window_size  (Mh, Mw)        window of N = Mh*Mw tokens.
    shift_size   (sh, sw)        cyclic shift: the map is rolled by (-sh, -sw), partitioned, attended, reversed
                                 and rolled back. Windows straddling the roll seam get an additive mask of -100
                                 (timm's constant, not -inf) between tokens of different shift regions.
    bias         (heads, N, N)   the relative-position bias already gathered per token pair (V1:
                                 table[rel_index]; V2: 16*sigmoid(cpb_mlp(coords))[rel_index]).
    logit_scale  (heads, 1, 1) or None
                 None -> V1: softmax(q k^T * d^-0.5 + bias + mask) v
                 given -> V2: softmax(norm(q) norm(k)^T * exp(min(logit_scale, log 100)) + bias + mask) v,
                 with norm() = F.normalize (eps 1e-12); the gradient of logit_scale is 0 where clamped.
    returns      (B, H, W, C)    attention output at each token's original (unshifted) position, heads
                                 concatenated in head order (the input of timm's `proj`).

Implementations: `window_attention_reference` (timm's steps in PyTorch; the tests' float64 oracle) and the Triton
kernels below (`impl="triton"`, the default on CUDA), wrapped by the autograd.Function `WindowAttention`.

Triton kernels
- Addressing. No roll, partition or reverse is materialised: token t = (i, j) of window (wy, wx) of image b lives
  at map position ((wy*Mh + i + sh) % H, (wx*Mw + j + sw) % W) of qkv, out, dout and dqkv alike; q, k, v of head h
  are the d contiguous channels h*d, C + h*d, 2C + h*d of that position (loads are d-contiguous rows; any batch /
  row / column strides). Windows are numbered b*nW + wy*nWx + wx. The shift mask is formed in registers from
  the region ids of the rolled-map position (rows [H-Mh, H-sh) -> 1, [H-sh, H) -> 2, else 0; same for columns;
  id = 3*row + col), non-zero only in windows on the last window row / column. N need not be a power of two:
  tiles are padded and masked (N = 49 -> 64); so is the head dim (d = 24 -> 32).
- Scores. z0 = c * q.k (V1, c = d^-0.5) or z0 = c * (q.k) / (max(|q|, eps) max(|k|, eps)) (V2, c = exp(min(
  logit_scale, log 100))): the V2 dot takes the raw q, k (unrounded in fp16 / bf16) and the inverse norms are
  applied to its fp32 result. s = z0 + bias[h] + mask; fp32 softmax and accumulation for every input dtype;
  fp32 inputs use IEEE (not TF32) dots.
- Forward (`_fwd_kernel`): program = (head, block of queries, WPP consecutive windows). Windows up to 8x8
  (N <= 64) are one tile (next power of two >= 16): plain softmax, and the bias tile is read once per program
  for its WPP windows (autotuned 1 / 2 / 4), so small windows still give each program enough work. Larger
  windows (12x12, 16x16, 24x24) tile: 64 queries per program, online softmax over blocks of 32 keys (N = 144,
  256, 576 -> 5, 8, 18 blocks; the full 576-key row does not fit in registers, and 64-key blocks spill on
  sm_90). Saved for backward: qkv, out, bias, c and the log-sum-exp per row (fp32, (B*nW, heads, N)). The V2
  norms are recomputed from the q / k tiles the backward loads anyway (a few FLOPs, no extra bytes).
- Backward, N <= 64 (`_bwd_fused_kernel`, one launch): program = (head, group of WPG consecutive windows); per
  window it recomputes P from lse, dP = dO v^T, delta = rowsum(P * dP) (the whole row is in the tile, so out is
  never read), dz = P (dP - delta), and writes dq, dk, dv at the unrolled positions of dqkv; dbias (sum of dz)
  and d c accumulate in registers over the group's windows.
- Backward, N > 64 (three launches): `_bwd_dq_kernel` (64 queries: dq over key blocks, with dz formed from
  delta = rowsum(dO * O) of the stored, rounded output as flash-attention does; on the way it sums the exact
  delta = rowsum(P * dP) (= dO . unrounded O), stores that one for the other two kernels, and corrects its d c
  term with it), `_bwd_dkdv_kernel` (64 keys: dk, dv over query blocks, in transposed (key x query) tiles so
  that the MMAs need no transposes), `_bwd_dbias_kernel` ((64 x 32) tile and group of windows: the sum of dz).
  Each recomputes P; nothing N x N reaches global memory except the dbias partials. Why the exact delta: d c
  sums dz * cos over every pair, and the rounded output's delta error does not cancel there (it is multiplied
  by sum_j P cos per row): in bf16 it made d c ~3.5x less accurate than PyTorch's mixed precision.
- V2 gradients: g = dz khat is one dot (dq needs it anyway); F.normalize's backward is r (g - xhat (xhat . g))
  where |x| >= eps and r g below it (r = 1 / max(|x|, eps)): one row sum of an (N, d) tile, for q and for k.
  d c = sum_ij dz_ij cos_ij is summed from the fp32 tiles (dz * z0 / c), not from xhat . g, whose dot rounds
  dz and khat to qkv's dtype: d c adds every pair of every window, so in bf16 those roundings would dominate
  it (one more row sum of an (N, N) tile). The kernels return d c; the clamp and the exp stay in PyTorch autograd (`window_attention`), so the gradient convention
  at the clamp is PyTorch's and timm's by construction: 0 above log 100; at exactly log 100 whatever this
  torch version's clamp does (no gradient in torch 2.14, the gradient passed in torch 2.11; tested either way).
- Determinism. Every output element is written by exactly one program and every sum runs in a fixed order:
  dbias partials (one (heads, N, N) fp32 slab per window group; groups sized for ~8 programs per SM) and the
  d c partials are reduced with torch.sum. This is the default: it costs one extra write and read of
  groups x heads x N^2 fp32 (a few % of the backward's bytes, e.g. 352 groups x 3 x 64^2 x 4 B = 17 MB against
  ~800 MB for SwinV2-T stage 1 at batch 128). WINDOW_ATTENTION_DETERMINISTIC_DBIAS=0 (or the module flag
  DETERMINISTIC_DBIAS) switches to fp32 atomics into one (heads, N, N) buffer.
- Launch. 4 warps per program (a 64-row tile is one Hopper warp group); on the GPU autotune picks WPP and
  num_stages (2 prefetches the next window or key block), 25 ms of measurement per configuration;
  WINDOW_ATTENTION_AUTOTUNE=0 (the tests) launches the first configuration untuned. Under TRITON_INTERPRET=1
  each kernel has a single configuration. dqkv comes back in qkv's dtype, dbias in bias's dtype, d logit_scale in its own dtype.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional at import time: CPU-only installs use the reference
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # pragma: no cover
    triton = None

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm clamps SwinV2's logit scale at log(100)
SHIFT_MASK = -100.0
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# dbias summed from per-group partials in a fixed order (bitwise reproducible); "0" selects fp32 atomics instead
DETERMINISTIC_DBIAS = os.environ.get("WINDOW_ATTENTION_DETERMINISTIC_DBIAS", "1") != "0"
# GPU autotuning. "0" (or the module flag) launches one fixed configuration per kernel (the first of `_configs`)
# instead of benchmarking all of them on the first call of each shape key: a correctness run (the tests) then
# compiles each kernel variant once instead of 2-8 times. Timings (the benchmark, training) keep autotuning.
AUTOTUNE = os.environ.get("WINDOW_ATTENTION_AUTOTUNE", "1") != "0"
# Benchmark warm-up only: launch configuration i (modulo each kernel's count) of every kernel, so that parallel
# processes can compile all configurations into Triton's disk cache before the timed process autotunes.
FORCE_CONFIG: int | None = None


# ----------------------------------------------------------------------------------------------- reference
def shift_region_ids(H: int, W: int, window_size: tuple[int, int], shift_size: tuple[int, int],
                     device=None) -> torch.Tensor:
    """(H, W) region id (0..8) of each position of the rolled map: tokens attend freely only within a region."""
    (mh, mw), (sh, sw) = window_size, shift_size
    rows = torch.zeros(H, dtype=torch.long, device=device)
    cols = torch.zeros(W, dtype=torch.long, device=device)
    if sh:
        rows[H - mh:H - sh], rows[H - sh:] = 1, 2
    if sw:
        cols[W - mw:W - sw], cols[W - sw:] = 1, 2
    return rows[:, None] * 3 + cols[None, :]


def shift_mask(H: int, W: int, window_size: tuple[int, int], shift_size: tuple[int, int],
               device=None, dtype=torch.float32) -> torch.Tensor:
    """(num_windows, N, N) additive mask: -100 between tokens of different shift regions, else 0."""
    mh, mw = window_size
    ids = shift_region_ids(H, W, window_size, shift_size, device)
    ids = ids.view(H // mh, mh, W // mw, mw).permute(0, 2, 1, 3).reshape(-1, mh * mw)
    return torch.where(ids[:, :, None] != ids[:, None, :], SHIFT_MASK, 0.0).to(dtype)


def _partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, ...) -> (B, num_windows, N, ...), windows in row-major order."""
    B, H, W = x.shape[:3]
    mh, mw = window_size
    rest = x.shape[3:]
    x = x.view(B, H // mh, mh, W // mw, mw, *rest).transpose(2, 3)
    return x.reshape(B, (H // mh) * (W // mw), mh * mw, *rest)


def _reverse(x: torch.Tensor, window_size: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of `_partition`."""
    B = x.shape[0]
    mh, mw = window_size
    rest = x.shape[3:]
    x = x.view(B, H // mh, W // mw, mh, mw, *rest).transpose(2, 3)
    return x.reshape(B, H, W, *rest)


def check_shapes(qkv: torch.Tensor, num_heads: int, window_size, shift_size, bias, logit_scale) -> None:
    B, H, W, C3 = qkv.shape
    mh, mw = window_size
    if C3 % (3 * num_heads):
        raise ValueError(f"window_attention: qkv channels {C3} are not 3 x heads ({num_heads}) x head_dim")
    if H % mh or W % mw:
        raise ValueError(f"window_attention: feature map {H}x{W} is not a multiple of the window {mh}x{mw}; "
                         f"pad it first")
    if not (0 <= shift_size[0] < mh and 0 <= shift_size[1] < mw):
        raise ValueError(f"window_attention: shift {shift_size} must lie in [0, window) for window {window_size}")
    if tuple(bias.shape) != (num_heads, mh * mw, mh * mw):
        raise ValueError(f"window_attention: bias shape {tuple(bias.shape)} != (heads, N, N) = "
                         f"{(num_heads, mh * mw, mh * mw)}")
    if logit_scale is not None and logit_scale.numel() != num_heads:
        raise ValueError(f"window_attention: logit_scale has {logit_scale.numel()} values for {num_heads} heads")


def window_attention_reference(qkv: torch.Tensor, num_heads: int, window_size: tuple[int, int],
                               shift_size: tuple[int, int], bias: torch.Tensor,
                               logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """timm's computation step by step (roll, partition, attention, reverse, roll back), with autograd.

    Dtypes. It accepts what the kernels accept, e.g. bf16 / fp16 qkv with an fp32 bias and logit scale, and then
    computes what timm's SwinV2 computes under torch.autocast(bf16) with fp32 parameters: the two matmuls in
    qkv's dtype (autocast runs matmuls in bf16), F.normalize in the promoted dtype and rounded back for the
    matmul (autocast runs norms in fp32), the logits promoted with the logit scale and the bias (the product
    with an fp32 parameter is fp32) for the scaling, bias, mask and softmax, P cast to v's dtype for P @ v
    (autocast casts matmul inputs to bf16), output in qkv's dtype. Under autocast the steps are the same ops,
    so a model gives timm's numbers either way. Why this and not "everything in qkv's dtype": the mixed
    inputs are how the kernels are used in bf16 training, and the same PyTorch code run in that precision is
    the baseline the kernels' bf16 error is judged against; all-bf16 inputs (bias and logit scale too) still
    give pure bf16, float64 inputs the float64 oracle.
    """
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    check_shapes(qkv, num_heads, window_size, shift_size, bias, logit_scale)
    H, W = qkv.shape[1:3]
    q, k, v = window_qkv(qkv, num_heads, window_size, shift_size)     # B, nW, heads, N, d
    if logit_scale is None:
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    else:
        norm_dtype = torch.promote_types(qkv.dtype, logit_scale.dtype)
        qn = F.normalize(q.to(norm_dtype), dim=-1).to(q.dtype)
        kn = F.normalize(k.to(norm_dtype), dim=-1).to(k.dtype)
        attn = qn @ kn.transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale.view(num_heads, 1, 1), max=LOGIT_SCALE_MAX).exp()
    attn = attn + bias                                                 # promotes: fp32 bias -> fp32 logits
    if any(shift_size):
        attn = attn + shift_mask(H, W, window_size, shift_size, qkv.device, attn.dtype)[None, :, None]
    return window_merge(attn.softmax(dim=-1).to(v.dtype) @ v, window_size, shift_size, H, W)


def window_qkv(qkv: torch.Tensor, num_heads: int, window_size: tuple[int, int], shift_size: tuple[int, int]):
    """(B, H, W, 3C) -> q, k, v, each (B, num_windows, heads, N, d): rolled by -shift, then partitioned."""
    B, C3 = qkv.shape[0], qkv.shape[3]
    d = C3 // 3 // num_heads
    if any(shift_size):
        qkv = torch.roll(qkv, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    win = _partition(qkv, window_size)                                 # B, nW, N, 3C
    return win.view(B, win.shape[1], win.shape[2], 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).unbind(0)


def window_merge(out: torch.Tensor, window_size: tuple[int, int], shift_size: tuple[int, int], H: int,
                 W: int) -> torch.Tensor:
    """Inverse of `window_qkv` for the attention output: (B, nW, heads, N, d) -> (B, H, W, heads * d)."""
    B, nW, heads, N, d = out.shape
    out = _reverse(out.permute(0, 1, 3, 2, 4).reshape(B, nW, N, heads * d), window_size, H, W)
    if any(shift_size):
        out = torch.roll(out, shifts=shift_size, dims=(1, 2))
    return out


# ----------------------------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _token_setup(tok, sh, sw, Mh: tl.constexpr, Mw: tl.constexpr):
        """Per program: (i, j) of window tokens `tok`, and their shift-region parts if the window lies on the
        last window row (3 * row region) / column (column region) of the rolled map; 0 elsewhere."""
        i = tok // Mw
        j = tok % Mw
        ri3 = tl.where(sh > 0, 3 + 3 * (i >= Mh - sh).to(tl.int32), 0)
        cj = tl.where(sw > 0, 1 + (j >= Mw - sw).to(tl.int32), 0)
        return i, j, ri3, cj

    @triton.jit
    def _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh: tl.constexpr, Mw: tl.constexpr,
               SHIFTED: tl.constexpr):
        """Window widx = b*nW + wy*nWx + wx -> (b as int64, map row, map column, shift-region id) of its tokens
        (i, j): the rolled-map position (wy*Mh + i, wx*Mw + j) sits at ((wy*Mh + i + sh) % H, (wx*Mw + j + sw) % W)
        of the unrolled map. Only windows on the last window row / column straddle the seam."""
        b = widx // nW
        r = widx % nW
        wy = r // nWx
        wx = r % nWx
        row = wy * Mh + sh + i
        col = wx * Mw + sw + j
        row = tl.where(row >= H, row - H, row)
        col = tl.where(col >= W, col - W, col)
        rid = i
        if SHIFTED:
            rid = tl.where(wy == H // Mh - 1, ri3, 0) + tl.where(wx == nWx - 1, cj, 0)
        return b.to(tl.int64), row, col, rid

    @triton.jit
    def _scores(q, k, rq, rk, c, V2: tl.constexpr, DOT: tl.constexpr):
        """z0 of one (rows x cols) tile: c * q.k (V1, c = d^-0.5) or c * cos(q, k) (V2: q.k * rq * rk, the dot
        taking the raw q, k so fp16 / bf16 inputs enter it unrounded)."""
        a = tl.dot(q, tl.trans(k), input_precision=DOT)
        if V2:
            return a * (c * rq)[:, None] * rk[None, :]
        return a * c

    @triton.jit
    def _bias_mask(z0, bias, rid, cid, SHIFTED: tl.constexpr):
        """s = z0 + bias (+ the -100 shift mask between regions)."""
        s = z0 + bias
        if SHIFTED:
            s += tl.where(rid[:, None] != cid[None, :], -100.0, 0.0)
        return s

    @triton.jit
    def _logits(q, k, rq, rk, c, bias, rid, cid, V2: tl.constexpr, SHIFTED: tl.constexpr, DOT: tl.constexpr):
        """Logits s of one (rows x cols) tile (`_scores`, then `_bias_mask`)."""
        return _bias_mask(_scores(q, k, rq, rk, c, V2, DOT), bias, rid, cid, SHIFTED)

    # ------------------------------------------------------------------------------------------- forward
    @triton.jit
    def _fwd_kernel(qkv_ptr, bias_ptr, scale_ptr, out_ptr, lse_ptr,
                    num_windows, nW, nWx, H, W, sh, sw, C, heads, sm_scale,
                    s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                    Mh: tl.constexpr, Mw: tl.constexpr, d: tl.constexpr, V2: tl.constexpr, SHIFTED: tl.constexpr,
                    STORE_LSE: tl.constexpr, DOT: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WPP: tl.constexpr):
        """Program (head, query block, WPP consecutive windows). One tile when N <= BLOCK_N (the bias tile read
        once for the WPP windows), else online softmax over key blocks of BLOCK_N."""
        N: tl.constexpr = Mh * Mw
        NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        SINGLE: tl.constexpr = BLOCK_N >= N  # then BLOCK_M == BLOCK_N: one tile
        pid = tl.program_id(0)
        h = pid % heads
        pid_m = (pid // heads) % NUM_M
        pid_w = pid // (heads * NUM_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        ch = h * d + dd                                          # q channels; k at +C, v at +2C
        q_mask = row_ok[:, None] & d_ok[None, :]
        bias_h = bias_ptr + h * (N * N)
        if V2:
            c = tl.load(scale_ptr + h).to(tl.float32)
        else:
            c = sm_scale
        i, j, ri3, cj = _token_setup(rows, sh, sw, Mh, Mw)
        if SINGLE:
            bias0 = tl.load(bias_h + rows[:, None] * N + rows[None, :], mask=row_ok[:, None] & row_ok[None, :],
                            other=0.0).to(tl.float32)
        w0 = pid_w * WPP
        for t in range(0, tl.minimum(w0 + WPP, num_windows) - w0):  # no branch in the body: pipelinable
            widx = w0 + t
            b, row, col, rid = _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            q_off = (b * s_qb + row * s_qh + col * s_qw)[:, None]
            q = tl.load(qkv_ptr + q_off + ch[None, :], mask=q_mask, other=0.0)
            rq = c
            if V2:
                qf = q.to(tl.float32)
                rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, 1)), EPS)
            if SINGLE:  # keys are the query tokens
                k = tl.load(qkv_ptr + q_off + (C + ch)[None, :], mask=q_mask, other=0.0)
                v = tl.load(qkv_ptr + q_off + (2 * C + ch)[None, :], mask=q_mask, other=0.0)
                rk = c
                if V2:
                    kf = k.to(tl.float32)
                    rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), EPS)
                s = _logits(q, k, rq, rk, c, bias0, rid, rid, V2, SHIFTED, DOT)
                s = tl.where(row_ok[None, :], s, float("-inf"))
                m_i = tl.max(s, 1)
                p = tl.exp(s - m_i[:, None])
                l_i = tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, input_precision=DOT)
            else:
                m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                l_i = tl.zeros((BLOCK_M,), tl.float32)
                acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    cols = n0 + tl.arange(0, BLOCK_N)
                    col_ok = cols < N
                    ci, cj2, cri3, ccj = _token_setup(cols, sh, sw, Mh, Mw)
                    _, crow, ccol, cid = _place(ci, cj2, cri3, ccj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
                    kv_off = (b * s_qb + crow * s_qh + ccol * s_qw)[:, None]
                    kv_mask = col_ok[:, None] & d_ok[None, :]
                    k = tl.load(qkv_ptr + kv_off + (C + ch)[None, :], mask=kv_mask, other=0.0)
                    v = tl.load(qkv_ptr + kv_off + (2 * C + ch)[None, :], mask=kv_mask, other=0.0)
                    bias = tl.load(bias_h + rows[:, None] * N + cols[None, :],
                                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    rk = c
                    if V2:
                        kf = k.to(tl.float32)
                        rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), EPS)
                    s = _logits(q, k, rq, rk, c, bias, rid, cid, V2, SHIFTED, DOT)
                    s = tl.where(col_ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
                    m_i = m_new
            o_off = (b * s_ob + row * s_oh + col * s_ow)[:, None]
            tl.store(out_ptr + o_off + ch[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                     mask=q_mask)
            if STORE_LSE:
                tl.store(lse_ptr + (widx.to(tl.int64) * heads + h) * N + rows, m_i + tl.log(l_i), mask=row_ok)

    # ------------------------------------------------------------------------------------------- backward
    @triton.jit
    def _bwd_fused_kernel(qkv_ptr, bias_ptr, scale_ptr, dout_ptr, lse_ptr, dqkv_ptr, dbias_ptr, dscale_ptr,
                          num_windows, WPG, nW, nWx, H, W, sh, sw, C, heads, sm_scale,
                          s_qb, s_qh, s_qw, s_ob, s_oh, s_ow, s_gb, s_gh, s_gw,
                          Mh: tl.constexpr, Mw: tl.constexpr, d: tl.constexpr, V2: tl.constexpr, SHIFTED: tl.constexpr,
                          ATOMIC: tl.constexpr, DOT: tl.constexpr, EPS: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """Whole window in one tile (N <= BLOCK). Program (head, group of WPG consecutive windows): dq, dk, dv
        of each window, and the group's sums of dz (dbias) and of dz * cos (d scale), kept in registers."""
        N: tl.constexpr = Mh * Mw
        pid = tl.program_id(0)
        h = pid % heads
        g = pid // heads
        tok = tl.arange(0, BLOCK)
        ok = tok < N
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        ch = h * d + dd
        t_mask = ok[:, None] & d_ok[None, :]
        if V2:
            c = tl.load(scale_ptr + h).to(tl.float32)
        else:
            c = sm_scale
        i, j, ri3, cj = _token_setup(tok, sh, sw, Mh, Mw)
        bias_h = bias_ptr + h * (N * N)
        dbias = tl.zeros((BLOCK, BLOCK), tl.float32)
        dsc = tl.zeros((BLOCK,), tl.float32)
        w0 = g * WPG
        w1 = tl.minimum(w0 + WPG, num_windows)
        for t in range(0, w1 - w0):
            widx = w0 + t
            b, row, col, rid = _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            off = (b * s_qb + row * s_qh + col * s_qw)[:, None]
            q = tl.load(qkv_ptr + off + ch[None, :], mask=t_mask, other=0.0)
            k = tl.load(qkv_ptr + off + (C + ch)[None, :], mask=t_mask, other=0.0)
            v = tl.load(qkv_ptr + off + (2 * C + ch)[None, :], mask=t_mask, other=0.0)
            do = tl.load(dout_ptr + (b * s_ob + row * s_oh + col * s_ow)[:, None] + ch[None, :], mask=t_mask,
                         other=0.0)
            lse = tl.load(lse_ptr + (widx.to(tl.int64) * heads + h) * N + tok, mask=ok, other=0.0)
            rq = c
            rk = c
            if V2:
                qf = q.to(tl.float32)
                kf = k.to(tl.float32)
                nq = tl.sqrt(tl.sum(qf * qf, 1))
                nk = tl.sqrt(tl.sum(kf * kf, 1))
                rq = 1.0 / tl.maximum(nq, EPS)
                rk = 1.0 / tl.maximum(nk, EPS)
            bias = tl.load(bias_h + tok[:, None] * N + tok[None, :], mask=ok[:, None] & ok[None, :], other=0.0)
            z0 = _scores(q, k, rq, rk, c, V2, DOT)
            s = _bias_mask(z0, bias.to(tl.float32), rid, rid, SHIFTED)
            p = tl.where(ok[None, :], tl.exp(s - lse[:, None]), 0.0)  # padded rows: q = dO = 0, so dz = 0
            dp = tl.dot(do, tl.trans(v), input_precision=DOT)
            dz = p * (dp - tl.sum(p * dp, 1)[:, None])  # the whole row is here: delta = rowsum(P * dP)
            dbias += dz
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT)
            if V2:
                # with g = dz khat (the gradient of qhat, over c) and F.normalize's backward
                # dx = r (g - xhat (xhat . g)) where |x| >= eps, r g below (xhat . g = sum_j dz_ij cos_ij)
                qh = qf * rq[:, None]
                kh = kf * rk[:, None]
                gq = tl.dot(dz.to(q.dtype), kh.to(q.dtype), input_precision=DOT)
                gk = tl.dot(tl.trans(dz).to(q.dtype), qh.to(q.dtype), input_precision=DOT)
                cq = tl.sum(qh * gq, 1)
                ck = tl.sum(kh * gk, 1)
                # d c = sum_ij dz_ij cos_ij, from the fp32 tiles (dz z0 = c dz cos), not from cq: cq comes out
                # of a dot whose inputs dz and khat are rounded to qkv's dtype, and d c adds every pair of every
                # window, so those roundings would dominate it in bf16
                dsc += tl.sum(dz * z0, 1)
                dq = (gq - tl.where(nq >= EPS, cq, 0.0)[:, None] * qh) * (c * rq)[:, None]
                dk = (gk - tl.where(nk >= EPS, ck, 0.0)[:, None] * kh) * (c * rk)[:, None]
            else:
                dq = tl.dot(dz.to(q.dtype), k, input_precision=DOT) * c
                dk = tl.dot(tl.trans(dz).to(q.dtype), q, input_precision=DOT) * c
            ty = dqkv_ptr.dtype.element_ty
            g_off = (b * s_gb + row * s_gh + col * s_gw)[:, None]
            tl.store(dqkv_ptr + g_off + ch[None, :], dq.to(ty), mask=t_mask)
            tl.store(dqkv_ptr + g_off + (C + ch)[None, :], dk.to(ty), mask=t_mask)
            tl.store(dqkv_ptr + g_off + (2 * C + ch)[None, :], dv.to(ty), mask=t_mask)
        tile = tok[:, None] * N + tok[None, :]
        pair_ok = ok[:, None] & ok[None, :]
        if ATOMIC:
            tl.atomic_add(dbias_ptr + h * (N * N) + tile, dbias, mask=pair_ok)
        else:
            tl.store(dbias_ptr + pid.to(tl.int64) * (N * N) + tile, dbias, mask=pair_ok)
        if V2:
            tl.store(dscale_ptr + pid, tl.sum(dsc, 0) / c)

    @triton.jit
    def _bwd_dq_kernel(qkv_ptr, bias_ptr, scale_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, dscale_ptr,
                       num_windows, nW, nWx, H, W, sh, sw, C, heads, sm_scale,
                       s_qb, s_qh, s_qw, s_ob, s_oh, s_ow, s_ab, s_ah, s_aw, s_gb, s_gh, s_gw,
                       Mh: tl.constexpr, Mw: tl.constexpr, d: tl.constexpr, V2: tl.constexpr, SHIFTED: tl.constexpr,
                       DOT: tl.constexpr, EPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WPP: tl.constexpr):
        """Tiled path, program (head, query block, WPP windows): delta = rowsum(dO * O) (stored for the other
        two kernels), dq over all key blocks, and per window the block's sum of dz * cos (d c)."""
        N: tl.constexpr = Mh * Mw
        NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        pid = tl.program_id(0)
        h = pid % heads
        pid_m = (pid // heads) % NUM_M
        pid_w = pid // (heads * NUM_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        ch = h * d + dd
        q_mask = row_ok[:, None] & d_ok[None, :]
        bias_h = bias_ptr + h * (N * N)
        if V2:
            c = tl.load(scale_ptr + h).to(tl.float32)
        else:
            c = sm_scale
        i, j, ri3, cj = _token_setup(rows, sh, sw, Mh, Mw)
        w0 = pid_w * WPP
        for t in range(0, tl.minimum(w0 + WPP, num_windows) - w0):  # no branch in the body: pipelinable
            widx = w0 + t
            b, row, col, rid = _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            q = tl.load(qkv_ptr + (b * s_qb + row * s_qh + col * s_qw)[:, None] + ch[None, :], mask=q_mask,
                        other=0.0)
            o = tl.load(out_ptr + (b * s_ab + row * s_ah + col * s_aw)[:, None] + ch[None, :], mask=q_mask,
                        other=0.0)
            do = tl.load(dout_ptr + (b * s_ob + row * s_oh + col * s_ow)[:, None] + ch[None, :], mask=q_mask,
                         other=0.0)
            row_idx = (widx.to(tl.int64) * heads + h) * N + rows
            lse = tl.load(lse_ptr + row_idx, mask=row_ok, other=0.0)
            # this pass forms dz with delta from the stored (rounded) output, as flash-attention does, and adds up
            # the exact delta = rowsum(P * dP) = dO . (unrounded O) on the way, for dkdv / dbias and for d c
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            delta_exact = tl.zeros((BLOCK_M,), tl.float32)
            pz = tl.zeros((BLOCK_M,), tl.float32)   # V2: sum_j P_ij z0_ij = c sum_j P_ij cos_ij
            dzz = tl.zeros((BLOCK_M,), tl.float32)  # V2: sum_j dz_ij z0_ij = c sum_j dz_ij cos_ij (d c, fp32)
            rq = c
            if V2:
                qf = q.to(tl.float32)
                nq = tl.sqrt(tl.sum(qf * qf, 1))
                rq = 1.0 / tl.maximum(nq, EPS)
            acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                ci, cj2, cri3, ccj = _token_setup(cols, sh, sw, Mh, Mw)
                _, crow, ccol, cid = _place(ci, cj2, cri3, ccj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
                kv_off = (b * s_qb + crow * s_qh + ccol * s_qw)[:, None]
                kv_mask = col_ok[:, None] & d_ok[None, :]
                k = tl.load(qkv_ptr + kv_off + (C + ch)[None, :], mask=kv_mask, other=0.0)
                v = tl.load(qkv_ptr + kv_off + (2 * C + ch)[None, :], mask=kv_mask, other=0.0)
                pair_ok = row_ok[:, None] & col_ok[None, :]
                bias = tl.load(bias_h + rows[:, None] * N + cols[None, :], mask=pair_ok, other=0.0).to(tl.float32)
                rk = c
                if V2:
                    kf = k.to(tl.float32)
                    rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), EPS)
                z0 = _scores(q, k, rq, rk, c, V2, DOT)
                p = tl.where(pair_ok, tl.exp(_bias_mask(z0, bias, rid, cid, SHIFTED) - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT)
                dz = p * (dp - delta[:, None])
                delta_exact += tl.sum(p * dp, 1)
                if V2:
                    pz += tl.sum(p * z0, 1)
                    dzz += tl.sum(dz * z0, 1)
                    acc += tl.dot(dz.to(q.dtype), (kf * rk[:, None]).to(q.dtype), input_precision=DOT)
                else:
                    acc += tl.dot(dz.to(q.dtype), k, input_precision=DOT)
            tl.store(delta_ptr + row_idx, delta_exact, mask=row_ok)
            if V2:  # as in the fused kernel; one d-scale partial per (window, query block, head)
                qh = qf * rq[:, None]
                cq = tl.sum(qh * acc, 1)
                # d c = sum_ij dz_ij cos_ij from the fp32 tiles (as in the fused kernel) and with the exact delta:
                # dz changes by P_ij (delta_i - delta_exact_i), so row i's term by (delta_i - delta_exact_i)
                # sum_j P_ij cos_ij. Without it the output's rounding (bf16: 2^-9 relative) enters every row's term
                # with the sign of sum_j P cos and d c ends up several times less accurate than PyTorch's
                # mixed-precision backward (dq is fine as is: the error stays per element there).
                dsc_rows = (dzz + (delta - delta_exact) * pz) / c
                tl.store(dscale_ptr + (widx.to(tl.int64) * NUM_M + pid_m) * heads + h, tl.sum(dsc_rows, 0))
                dq = (acc - tl.where(nq >= EPS, cq, 0.0)[:, None] * qh) * (c * rq)[:, None]
            else:
                dq = acc * c
            tl.store(dqkv_ptr + (b * s_gb + row * s_gh + col * s_gw)[:, None] + ch[None, :],
                     dq.to(dqkv_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _bwd_dkdv_kernel(qkv_ptr, bias_ptr, scale_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
                         num_windows, nW, nWx, H, W, sh, sw, C, heads, sm_scale,
                         s_qb, s_qh, s_qw, s_ob, s_oh, s_ow, s_gb, s_gh, s_gw,
                         Mh: tl.constexpr, Mw: tl.constexpr, d: tl.constexpr, V2: tl.constexpr, SHIFTED: tl.constexpr,
                         DOT: tl.constexpr, EPS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WPP: tl.constexpr):
        """Tiled path, program (head, key block, WPP windows): dk and dv over all query blocks."""
        N: tl.constexpr = Mh * Mw
        NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        pid = tl.program_id(0)
        h = pid % heads
        pid_n = (pid // heads) % NUM_N
        pid_w = pid // (heads * NUM_N)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        ch = h * d + dd
        kv_mask = col_ok[:, None] & d_ok[None, :]
        bias_h = bias_ptr + h * (N * N)
        if V2:
            c = tl.load(scale_ptr + h).to(tl.float32)
        else:
            c = sm_scale
        ci, cj2, cri3, ccj = _token_setup(cols, sh, sw, Mh, Mw)
        w0 = pid_w * WPP
        for t in range(0, tl.minimum(w0 + WPP, num_windows) - w0):  # no branch in the body: pipelinable
            widx = w0 + t
            b, crow, ccol, cid = _place(ci, cj2, cri3, ccj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            kv_off = (b * s_qb + crow * s_qh + ccol * s_qw)[:, None]
            k = tl.load(qkv_ptr + kv_off + (C + ch)[None, :], mask=kv_mask, other=0.0)
            v = tl.load(qkv_ptr + kv_off + (2 * C + ch)[None, :], mask=kv_mask, other=0.0)
            rk = c
            if V2:
                kf = k.to(tl.float32)
                nk = tl.sqrt(tl.sum(kf * kf, 1))
                rk = 1.0 / tl.maximum(nk, EPS)
            dk_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            dv_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            for m0 in range(0, N, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < N
                q_mask = row_ok[:, None] & d_ok[None, :]
                i, j, ri3, cj = _token_setup(rows, sh, sw, Mh, Mw)
                _, row, col, rid = _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
                q = tl.load(qkv_ptr + (b * s_qb + row * s_qh + col * s_qw)[:, None] + ch[None, :], mask=q_mask,
                            other=0.0)
                do = tl.load(dout_ptr + (b * s_ob + row * s_oh + col * s_ow)[:, None] + ch[None, :],
                             mask=q_mask, other=0.0)
                row_idx = (widx.to(tl.int64) * heads + h) * N + rows
                lse = tl.load(lse_ptr + row_idx, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + row_idx, mask=row_ok, other=0.0)
                # transposed tiles (keys x queries): the MMAs take the program's 64 keys as their rows, and
                # neither P nor dz needs a transpose (the logits formula is symmetric in (q, rq) <-> (k, rk))
                pair_ok = col_ok[:, None] & row_ok[None, :]
                bias_t = tl.load(bias_h + rows[None, :] * N + cols[:, None], mask=pair_ok, other=0.0)
                rq = c
                if V2:
                    qf = q.to(tl.float32)
                    rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, 1)), EPS)
                s_t = _logits(k, q, rk, rq, c, bias_t.to(tl.float32), cid, rid, V2, SHIFTED, DOT)
                p_t = tl.where(pair_ok, tl.exp(s_t - lse[None, :]), 0.0)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT)
                dz_t = p_t * (dp_t - delta[None, :])
                dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision=DOT)
                if V2:
                    dk_acc += tl.dot(dz_t.to(q.dtype), (qf * rq[:, None]).to(q.dtype), input_precision=DOT)
                else:
                    dk_acc += tl.dot(dz_t.to(q.dtype), q, input_precision=DOT)
            if V2:
                kh = kf * rk[:, None]
                ck = tl.sum(kh * dk_acc, 1)
                dk = (dk_acc - tl.where(nk >= EPS, ck, 0.0)[:, None] * kh) * (c * rk)[:, None]
            else:
                dk = dk_acc * c
            g_off = (b * s_gb + crow * s_gh + ccol * s_gw)[:, None]
            ty = dqkv_ptr.dtype.element_ty
            tl.store(dqkv_ptr + g_off + (C + ch)[None, :], dk.to(ty), mask=kv_mask)
            tl.store(dqkv_ptr + g_off + (2 * C + ch)[None, :], dv_acc.to(ty), mask=kv_mask)

    @triton.jit
    def _bwd_dbias_kernel(qkv_ptr, bias_ptr, scale_ptr, dout_ptr, lse_ptr, delta_ptr, dbias_ptr,
                          num_windows, WPG, nW, nWx, H, W, sh, sw, C, heads, sm_scale,
                          s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                          Mh: tl.constexpr, Mw: tl.constexpr, d: tl.constexpr, V2: tl.constexpr, SHIFTED: tl.constexpr,
                          ATOMIC: tl.constexpr, DOT: tl.constexpr, EPS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tiled path, program (head, (query block, key block) tile, group of WPG windows): the group's sum of
        dz over that tile, recomputed from q, k, v, dO, lse and delta."""
        N: tl.constexpr = Mh * Mw
        NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        pid = tl.program_id(0)
        h = pid % heads
        tt = (pid // heads) % (NUM_M * NUM_N)
        g = pid // (heads * NUM_M * NUM_N)
        rows = (tt // NUM_N) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tt % NUM_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col_ok = cols < N
        pair_ok = row_ok[:, None] & col_ok[None, :]
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        ch = h * d + dd
        q_mask = row_ok[:, None] & d_ok[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        tile = rows[:, None] * N + cols[None, :]
        bias = tl.load(bias_ptr + h * (N * N) + tile, mask=pair_ok, other=0.0).to(tl.float32)
        if V2:
            c = tl.load(scale_ptr + h).to(tl.float32)
        else:
            c = sm_scale
        i, j, ri3, cj = _token_setup(rows, sh, sw, Mh, Mw)
        ci, cj2, cri3, ccj = _token_setup(cols, sh, sw, Mh, Mw)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        w0 = g * WPG
        w1 = tl.minimum(w0 + WPG, num_windows)
        for t in range(0, w1 - w0):
            widx = w0 + t
            b, row, col, rid = _place(i, j, ri3, cj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            _, crow, ccol, cid = _place(ci, cj2, cri3, ccj, widx, nW, nWx, H, W, sh, sw, Mh, Mw, SHIFTED)
            kv_off = (b * s_qb + crow * s_qh + ccol * s_qw)[:, None]
            q = tl.load(qkv_ptr + (b * s_qb + row * s_qh + col * s_qw)[:, None] + ch[None, :], mask=q_mask, other=0.0)
            k = tl.load(qkv_ptr + kv_off + (C + ch)[None, :], mask=kv_mask, other=0.0)
            v = tl.load(qkv_ptr + kv_off + (2 * C + ch)[None, :], mask=kv_mask, other=0.0)
            do = tl.load(dout_ptr + (b * s_ob + row * s_oh + col * s_ow)[:, None] + ch[None, :], mask=q_mask,
                         other=0.0)
            row_idx = (widx.to(tl.int64) * heads + h) * N + rows
            lse = tl.load(lse_ptr + row_idx, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + row_idx, mask=row_ok, other=0.0)
            rq = c
            rk = c
            if V2:
                qf = q.to(tl.float32)
                kf = k.to(tl.float32)
                rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, 1)), EPS)
                rk = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), EPS)
            s = _logits(q, k, rq, rk, c, bias, rid, cid, V2, SHIFTED, DOT)
            p = tl.where(pair_ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT)
            acc += p * (dp - delta[:, None])
        if ATOMIC:
            tl.atomic_add(dbias_ptr + h * (N * N) + tile, acc, mask=pair_ok)
        else:
            tl.store(dbias_ptr + (g.to(tl.int64) * heads + h) * (N * N) + tile, acc, mask=pair_ok)

    # ------------------------------------------------------------------------------------------- tuning
    def _configs(metas: list[dict], stages: list[int], capped: list[dict] = ()) -> list:
        """Autotune configurations; exactly one under the interpreter (it runs each config in Python: a sweep there only costs time). Always 4 warps:
        a 64-row tile is one Hopper warp group (with 8 warps the MMA layout replicates it; with 2, the fused
        backward spills, per ptxas for sm_90). num_stages 2 prefetches the next window (the window loops have
        no branch in their body) or the next key block. `capped`: the same with registers capped at 128 (the
        single-tile forward needs 168: 3 programs per SM uncapped, 4 capped with a small spill).
        The first configuration is the one launched without autotuning (AUTOTUNE off): the most windows per
        program and the deepest pipeline, the code path with the most to get wrong (ragged window tails,
        prefetch across windows), so that untuned correctness runs on a GPU cover it."""
        if INTERPRET:
            return [triton.Config(metas[-1], num_warps=4, num_stages=1)]
        first = triton.Config(metas[-1], num_warps=4, num_stages=stages[-1])
        return ([first] + [triton.Config(m, num_warps=4, num_stages=st) for m in metas for st in stages
                           if (m, st) != (metas[-1], stages[-1])]
                + [triton.Config(m, num_warps=4, num_stages=1, maxnreg=128) for m in capped])

    def _prune(configs, named_args, **kwargs):
        """The configurations to benchmark for a new key: all (AUTOTUNE), the first (AUTOTUNE off: one config,
        so the autotuner launches it without benchmarking), or the FORCE_CONFIG-th (benchmark warm-up)."""
        if FORCE_CONFIG is not None:
            return [configs[FORCE_CONFIG % len(configs)]]
        return list(configs) if AUTOTUNE else [configs[0]]

    def _bench(kernel_call, quantiles):
        """Autotuning measurement: 5 ms warm-up and 25 ms of repetitions per configuration (Triton's default is
        25 + 100 ms). The configurations differ by 10-30 %, which 25 ms of a 0.05-5 ms kernel resolves; every
        new shape key costs ~10 configurations, so the default would add ~1.5 s per key to the first step."""
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    def _autotune(configs, key, **kw):
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune}, do_bench=_bench,
                               **kw)

    _KEY = ["Mh", "Mw", "d", "V2", "SHIFTED", "BLOCK_M", "BLOCK_N"]
    _fwd = _autotune(_configs([{"WPP": 1}, {"WPP": 2}, {"WPP": 4}], [1, 2], [{"WPP": 2}, {"WPP": 4}]),
                     _KEY)(_fwd_kernel)
    _bwd_dq = _autotune(_configs([{"WPP": 1}, {"WPP": 2}], [1, 2]), _KEY)(_bwd_dq_kernel)
    _bwd_dkdv = _autotune(_configs([{"WPP": 1}, {"WPP": 2}], [1, 2]), _KEY)(_bwd_dkdv_kernel)
    _bwd_fused = _autotune(_configs([{}], [1, 2]), ["Mh", "Mw", "d", "V2", "SHIFTED", "ATOMIC"],
                           reset_to_zero=["dbias_ptr"])(_bwd_fused_kernel)
    _bwd_dbias = _autotune(_configs([{}], [1, 2]), _KEY + ["ATOMIC"], reset_to_zero=["dbias_ptr"])(_bwd_dbias_kernel)
    AUTOTUNERS = (_fwd, _bwd_dq, _bwd_dkdv, _bwd_fused, _bwd_dbias)


def clear_autotune_cache() -> None:
    """Forget the configuration chosen per shape key (after changing AUTOTUNE or FORCE_CONFIG)."""
    if triton is not None:
        for tuner in AUTOTUNERS:
            tuner.cache.clear()


# ----------------------------------------------------------------------------------------------- host side
def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output buffer comes from here (tests swap it for a NaN fill to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Tile sizes (module constants so that tests can send small windows through the tiled path)
_SINGLE_TILE_MAX = 64   # windows up to 8x8 run whole in one tile (fused backward); larger ones are tiled:
_TILE_OUTER = 64        # the tokens a program owns (queries in fwd / dq / dbias, keys in dkdv): one warp group
_TILE_INNER = 32        # the tokens it loops over: N = 144, 256, 576 -> 5, 8, 18 blocks (64-wide blocks spill)


def _blocks(N: int) -> tuple[int, int]:
    """(outer, inner) token blocks; equal (one tile) when N <= _SINGLE_TILE_MAX."""
    if N <= _SINGLE_TILE_MAX:
        block = max(16, triton.next_power_of_2(N))
        return block, block
    return _TILE_OUTER, _TILE_INNER


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _group_size(num_windows: int, programs_per_group: int, device: torch.device) -> int:
    """Windows per dbias group: enough programs to fill the GPU (8 per SM), no more, since every group writes
    one (heads, N, N) fp32 partial. Under the interpreter: 4 windows, so that tests see a ragged last group."""
    if INTERPRET or device.type != "cuda":
        return min(4, num_windows)
    groups = max(1, min(num_windows, 8 * _num_sms(device) // max(1, programs_per_group)))
    return triton.cdiv(num_windows, groups)


class _Geometry:
    """Shapes and launch constants shared by the forward and backward launches."""

    def __init__(self, qkv: torch.Tensor, num_heads: int, window_size, shift_size, scale):
        B, H, W, C3 = qkv.shape
        self.B, self.H, self.W, self.C = B, H, W, C3 // 3
        self.heads, self.d = num_heads, self.C // num_heads
        (self.Mh, self.Mw), (self.sh, self.sw) = tuple(window_size), tuple(shift_size)
        self.N = self.Mh * self.Mw
        self.nWx = W // self.Mw
        self.nW = (H // self.Mh) * self.nWx
        self.num_windows = B * self.nW
        self.outer, self.inner = _blocks(self.N)
        self.BLOCK_D = max(16, triton.next_power_of_2(self.d))  # padded and masked for other head dims
        self.single = self.inner >= self.N
        self.v2 = scale is not None
        self.meta = dict(Mh=self.Mh, Mw=self.Mw, d=self.d, V2=self.v2, SHIFTED=bool(self.sh or self.sw),
                         DOT="ieee" if qkv.dtype == torch.float32 else "tf32",  # only fp32 operands care
                         EPS=1e-12)

    def scalars(self):
        return (self.nW, self.nWx, self.H, self.W, self.sh, self.sw, self.C, self.heads, self.d ** -0.5)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _channels_last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch / row / column strides but need the channel dimension dense."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _triton_forward(qkv: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None, num_heads: int,
                    window_size, shift_size, need_lse: bool = True):
    """(out (B, H, W, C) in qkv's dtype, lse (B*nW, heads, N) fp32 or None)."""
    g = _Geometry(qkv, num_heads, window_size, shift_size, scale)
    out = _empty((g.B, g.H, g.W, g.C), qkv.dtype, qkv.device)
    lse = _empty((g.num_windows, g.heads, g.N), torch.float32, qkv.device) if need_lse else None
    dummy = bias
    num_m = triton.cdiv(g.N, g.outer)
    grid = lambda meta: (g.heads * num_m * triton.cdiv(g.num_windows, meta["WPP"]),)
    with _device_ctx(qkv):
        _fwd[grid](qkv, bias, scale if g.v2 else dummy, out, lse if need_lse else dummy,
                   g.num_windows, *g.scalars(), *_strides(qkv), *_strides(out), **g.meta, STORE_LSE=need_lse,
                   BLOCK_M=g.outer, BLOCK_N=g.inner, BLOCK_D=g.BLOCK_D)
    return out, lse


def _triton_backward(dout: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                     out: torch.Tensor, lse: torch.Tensor, num_heads: int, window_size, shift_size,
                     deterministic: bool = True):
    """(dqkv in qkv's dtype, dbias (heads, N, N) fp32, d scale (heads,) fp32 or None)."""
    g = _Geometry(qkv, num_heads, window_size, shift_size, scale)
    dev = qkv.device
    dout = _channels_last_contiguous(dout)
    dqkv = _empty(qkv.shape, qkv.dtype, dev)
    dummy = bias
    rows_outer = dict(BLOCK_M=g.outer, BLOCK_N=g.inner, BLOCK_D=g.BLOCK_D)   # fwd, dq, dbias
    cols_outer = dict(BLOCK_M=g.inner, BLOCK_N=g.outer, BLOCK_D=g.BLOCK_D)   # dkdv
    num_outer = triton.cdiv(g.N, g.outer)
    tiles = 1 if g.single else num_outer * triton.cdiv(g.N, g.inner)
    wpg = _group_size(g.num_windows, g.heads * tiles, dev)
    groups = triton.cdiv(g.num_windows, wpg)
    if deterministic:  # one partial per group, summed in a fixed order below
        dbias = _empty((groups, g.heads, g.N, g.N), torch.float32, dev)
    else:
        dbias = torch.zeros((g.heads, g.N, g.N), dtype=torch.float32, device=dev)
    with _device_ctx(qkv):
        if g.single:
            dscale = _empty((groups * g.heads,), torch.float32, dev) if g.v2 else None
            _bwd_fused[(groups * g.heads,)](
                qkv, bias, scale if g.v2 else dummy, dout, lse, dqkv, dbias, dscale if g.v2 else dummy,
                g.num_windows, wpg, *g.scalars(), *_strides(qkv), *_strides(dout), *_strides(dqkv), **g.meta,
                ATOMIC=not deterministic, BLOCK=g.outer, BLOCK_D=g.BLOCK_D)
        else:
            delta = _empty((g.num_windows, g.heads, g.N), torch.float32, dev)
            per_outer = lambda meta: (g.heads * num_outer * triton.cdiv(g.num_windows, meta["WPP"]),)
            # dq first: it also writes delta = rowsum(dO * O), which the other two read
            dscale = _empty((g.num_windows * num_outer * g.heads,), torch.float32, dev) if g.v2 else None
            _bwd_dq[per_outer](
                qkv, bias, scale if g.v2 else dummy, out, dout, lse, delta, dqkv, dscale if g.v2 else dummy,
                g.num_windows, *g.scalars(), *_strides(qkv), *_strides(dout), *_strides(out), *_strides(dqkv),
                **g.meta, **rows_outer)
            _bwd_dkdv[per_outer](
                qkv, bias, scale if g.v2 else dummy, dout, lse, delta, dqkv,
                g.num_windows, *g.scalars(), *_strides(qkv), *_strides(dout), *_strides(dqkv), **g.meta,
                **cols_outer)
            _bwd_dbias[(groups * tiles * g.heads,)](
                qkv, bias, scale if g.v2 else dummy, dout, lse, delta, dbias,
                g.num_windows, wpg, *g.scalars(), *_strides(qkv), *_strides(dout), **g.meta,
                ATOMIC=not deterministic, **rows_outer)
    if deterministic:
        dbias = dbias.sum(0)
    dscale = dscale.view(-1, g.heads).sum(0) if g.v2 else None
    return dqkv, dbias, dscale


class WindowAttention(torch.autograd.Function):
    """Triton forward / backward of `window_attention`. Takes the V2 scale c = exp(min(logit_scale, log 100))
    as an input (None for V1) and returns d c: the clamp and exp stay in PyTorch (see `window_attention`)."""

    @staticmethod
    def forward(ctx, qkv, bias, scale, num_heads: int, window_size, shift_size, deterministic: bool = True):
        qkv = _channels_last_contiguous(qkv)
        bias_c = bias.contiguous()
        scale_c = None if scale is None else scale.reshape(num_heads).float().contiguous()
        out, lse = _triton_forward(qkv, bias_c, scale_c, num_heads, window_size, shift_size, need_lse=True)
        ctx.save_for_backward(qkv, bias_c, scale_c, out, lse)
        ctx.cfg = (num_heads, tuple(window_size), tuple(shift_size), deterministic)
        ctx.in_dtypes = (bias.dtype, None if scale is None else (scale.dtype, scale.shape))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, bias, scale, out, lse = ctx.saved_tensors
        num_heads, window_size, shift_size, deterministic = ctx.cfg
        dqkv, dbias, dscale = _triton_backward(dout, qkv, bias, scale, out, lse, num_heads, window_size,
                                               shift_size, deterministic)
        bias_dtype, scale_meta = ctx.in_dtypes
        if dscale is not None:
            dscale = dscale.to(scale_meta[0]).reshape(scale_meta[1])
        return dqkv, dbias.to(bias_dtype), dscale, None, None, None, None


def triton_available(qkv: torch.Tensor) -> bool:
    """Triton importable and a device it runs on: CUDA, or the CPU interpreter (fp32 / fp16 only)."""
    if triton is None:
        return False
    if qkv.is_cuda:
        return True
    return INTERPRET and qkv.dtype in (torch.float32, torch.float16)


def flops(B: int, H: int, W: int, C: int, num_heads: int, window_size, pass_: str = "fwd") -> float:
    """Matmul FLOPs: forward 2 GEMMs (q k^T, p v) of N x N x d per window and head = 4 * B*H*W * N * C;
    backward 5 (q k^T recomputed, dO v^T, p^T dO, dz k, dz^T q) = 2.5x forward."""
    N = window_size[0] * window_size[1]
    fwd = 4.0 * B * H * W * N * C
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def bytes_moved(B: int, H: int, W: int, C: int, num_heads: int, window_size, elem_bytes: int = 2,
                bias_bytes: int = 4, pass_: str = "fwd") -> float:
    """The bytes floor: every tensor read or written once. Forward: read qkv and bias, write out. Backward:
    read qkv, out, dout, lse (fp32 per token and head) and bias, write dqkv and dbias (fp32 logit-scale terms
    are negligible). The fused single-tile backward (N <= 64) moves less than this floor: it does not read out
    (delta = rowsum(P * dP) is formed in registers)."""
    N = window_size[0] * window_size[1]
    tokens = B * H * W
    bias = num_heads * N * N * bias_bytes
    fwd = tokens * 4 * C * elem_bytes + bias
    bwd = tokens * (3 * C + C + C + 3 * C) * elem_bytes + tokens * num_heads * 4 + 2 * bias
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ----------------------------------------------------------------------------------------------- entry point
def window_attention(qkv: torch.Tensor, num_heads: int, window_size: tuple[int, int],
                     shift_size: tuple[int, int], bias: torch.Tensor, logit_scale: torch.Tensor | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """The one function models call (see the module docstring for the contract).

    impl: "auto" (Triton on CUDA tensors when Triton is importable, else the reference), "triton" (forces the
    kernels: on the CPU they run under TRITON_INTERPRET=1, fp32 / fp16 only) or "reference"."""
    if impl == "auto":
        impl = "triton" if qkv.is_cuda and triton is not None else "reference"
    if impl == "reference":
        return window_attention_reference(qkv, num_heads, window_size, shift_size, bias, logit_scale)
    if impl != "triton":
        raise ValueError(f"window_attention: unknown impl {impl!r}")
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    check_shapes(qkv, num_heads, window_size, shift_size, bias, logit_scale)
    if not triton_available(qkv):
        raise ValueError(f"window_attention: impl='triton' needs Triton and a CUDA tensor, or TRITON_INTERPRET=1 "
                         f"with fp32/fp16 (got {qkv.dtype} on {qkv.device})")
    scale = None
    if logit_scale is not None:  # the clamp (and its gradient convention) is PyTorch's, exactly as in timm
        scale = torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().reshape(num_heads)
    inputs = (qkv, bias) if scale is None else (qkv, bias, scale)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        out, _ = _triton_forward(_channels_last_contiguous(qkv), bias.contiguous(),
                                 None if scale is None else scale.float().contiguous(), num_heads, window_size,
                                 shift_size, need_lse=False)
        return out
    return WindowAttention.apply(qkv, bias, scale, num_heads, window_size, shift_size, DETERMINISTIC_DBIAS)
