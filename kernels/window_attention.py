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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm clamps SwinV2's logit scale at log(100)
SHIFT_MASK = -100.0


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

    Computed in the input dtype, so it is also the "same PyTorch code in low precision" baseline.
    """
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    check_shapes(qkv, num_heads, window_size, shift_size, bias, logit_scale)
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    N = window_size[0] * window_size[1]
    shifted = any(shift_size)
    if shifted:
        qkv = torch.roll(qkv, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    win = _partition(qkv, window_size)                                 # B, nW, N, 3C
    nW = win.shape[1]
    q, k, v = win.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5).unbind(0)  # B, nW, heads, N, d
    if logit_scale is None:
        attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    else:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale.view(num_heads, 1, 1), max=LOGIT_SCALE_MAX).exp()
    attn = attn + bias.to(attn.dtype)
    if shifted:
        attn = attn + shift_mask(H, W, window_size, shift_size, qkv.device, attn.dtype)[None, :, None]
    out = attn.softmax(dim=-1) @ v                                     # B, nW, heads, N, d
    out = _reverse(out.permute(0, 1, 3, 2, 4).reshape(B, nW, N, C), window_size, H, W)
    if shifted:
        out = torch.roll(out, shifts=shift_size, dims=(1, 2))
    return out


# ----------------------------------------------------------------------------------------------- entry point
def window_attention(qkv: torch.Tensor, num_heads: int, window_size: tuple[int, int],
                     shift_size: tuple[int, int], bias: torch.Tensor, logit_scale: torch.Tensor | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """The one function models call (see the module docstring for the contract)."""
    if impl in ("auto", "reference"):
        return window_attention_reference(qkv, num_heads, window_size, shift_size, bias, logit_scale)
    raise ValueError(f"window_attention: unknown impl {impl!r}")
