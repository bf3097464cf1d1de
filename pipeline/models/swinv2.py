"""SwinV2 with timm's parameter layout, whose attention is `kernels.window_attention.window_attention`.

Every parameter has the name and shape of timm's `swinv2_*` models (timm/models/swin_transformer_v2.py), so
`create_swinv2(name).load_state_dict(timm_model.state_dict(), strict=True)` works both ways and the outputs are
timm's. The blocks never compute attention themselves: each one applies its qkv projection per token to the
whole (B, H, W, C) map and hands it to `window_attention(qkv, heads, window, shift, bias, logit_scale)`, which
does the roll, the window partition, the -100 shift mask, the attention and the reverse (PyTorch reference or
a Triton kernel; the model does not know which).

Feature maps that are not a multiple of the window (e.g. img_size=200 with window 8). timm's convention, kept
exactly: roll the map by (-s, -s), zero-pad it at the bottom/right to a window multiple, build the shift mask on
the padded map, attend, crop, roll back. The padded tokens are real keys: their input is 0, so their qkv is the
qkv bias (q_bias, 0, v_bias) and they attend / are attended with the relative-position bias (mask 0 within
their region). We reproduce it with torch ops around the same `window_attention` call, no second attention
code path: roll qkv by (-s, -s), append rows/columns holding the qkv of a zero token, roll the padded map back by
(+s, +s) (so that the roll inside `window_attention` recreates the padded, rolled map; its mask is then built on
the padded size, as timm's), then undo the same steps on the output. Permutations and concatenations only, so
the result is timm's up to floating-point summation order (tested at 1e-5).

Other timm rules kept: a stage whose resolution is <= the window uses window = resolution and no shift
(`always_partition=False`); odd feature maps are zero-padded before patch merging; post-norm blocks
(x + norm(attn(x))) with norm weights initialised to 0; `pretrained_window_sizes` rescales the log-spaced
relative coordinates fed to the continuous position bias MLP.

Not supported: attention-probability dropout (`attn_drop_rate` > 0; the window_attention contract has none),
resizing the patch size; `pretrained=True` (nothing downloads: load a state dict instead).
"""
from __future__ import annotations

import difflib
import math
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.window_attention import window_attention

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

__all__ = ["SwinTransformerV2", "create_swinv2", "list_swinv2_models", "SWINV2_MODELS"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _stage_values(value, num_stages: int, what: str) -> tuple[tuple[int, int], ...]:
    """An int, an (h, w) pair, or one int / pair per stage -> one (h, w) per stage (timm's reading: a sequence of
    two ints is one (h, w), not two stages)."""
    if not isinstance(value, (tuple, list)):
        value = (value,) * num_stages
    elif len(value) == 2 and not isinstance(value[0], (tuple, list)):
        value = (tuple(value),) * num_stages
    if len(value) != num_stages:
        raise ValueError(f"{what}: expected one value per stage ({num_stages}), got {value!r}")
    return tuple(_pair(v) for v in value)


# ------------------------------------------------------------------------------------------------- layers
class DropPath(nn.Module):
    """Stochastic depth per sample: keeps a residual branch with probability 1 - p and scales it by 1 / (1 - p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, H/p, W/p, C), LayerNorm over C (timm's `patch_embed.proj` / `.norm`)."""

    def __init__(self, img_size, patch_size, in_chans: int, embed_dim: int, strict_img_size: bool = True,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = _pair(patch_size)
        self.strict_img_size = strict_img_size
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def set_img_size(self, img_size) -> None:
        self.img_size = _pair(img_size)
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"SwinV2: input {H}x{W} does not match img_size {self.img_size[0]}x{self.img_size[1]} "
                             f"(build with img_size=..., or strict_img_size=False)")
        if not self.strict_img_size and (H % self.patch_size[0] or W % self.patch_size[1]):
            raise ValueError(f"SwinV2: input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout (timm's `mlp.fc1` / `mlp.fc2`)."""

    def __init__(self, dim: int, hidden: int, act_layer, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _log_spaced_coords(window: tuple[int, int], pretrained_window: tuple[int, int], device=None) -> torch.Tensor:
    """(1, 2Mh-1, 2Mw-1, 2) relative offsets (dh, dw), scaled to [-8, 8] by the (pretrained) window and
    log-spaced: sign(x) * log2(1 + |x|) / 3. A pretrained window > 0 keeps the coordinates of the window the
    weights were trained with, so a larger window extrapolates the position-bias MLP beyond +-8."""
    ref = pretrained_window if pretrained_window[0] > 0 else window
    dh = torch.arange(-(window[0] - 1), window[0], device=device, dtype=torch.float32) / max(ref[0] - 1, 1)
    dw = torch.arange(-(window[1] - 1), window[1], device=device, dtype=torch.float32) / max(ref[1] - 1, 1)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.unsqueeze(0)


def _relative_index(window: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) index into the flattened (2Mh-1) x (2Mw-1) offset table of each token pair (i, j), offset i - j."""
    mh, mw = window
    rows = torch.arange(mh, device=device).repeat_interleave(mw)
    cols = torch.arange(mw, device=device).repeat(mh)
    dh = rows[:, None] - rows[None, :] + (mh - 1)
    dw = cols[:, None] - cols[None, :] + (mw - 1)
    return dh * (2 * mw - 1) + dw


class WindowAttention(nn.Module):
    """SwinV2 attention parameters (timm's `attn.*`): cosine attention with a per-head logit scale and the
    continuous position bias 16 * sigmoid(cpb_mlp(log-spaced offsets)). The math is `window_attention`'s."""

    def __init__(self, dim: int, num_heads: int, window_size, pretrained_window_size=(0, 0), qkv_bias: bool = True,
                 proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"SwinV2: dim {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.pretrained_window_size = _pair(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10), **dd))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True, **dd), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
            self.register_buffer("k_bias", torch.zeros(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.window_size = None
        self.set_window_size(window_size)

    def set_window_size(self, window_size) -> None:
        window_size = _pair(window_size)
        if window_size == self.window_size:
            return
        self.window_size = window_size
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        float_dtype = dtype if dtype.is_floating_point else torch.float32
        self.register_buffer("relative_coords_table",
                             _log_spaced_coords(window_size, self.pretrained_window_size, device).to(float_dtype),
                             persistent=False)
        self.register_buffer("relative_position_index", _relative_index(window_size, device), persistent=False)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N): 16 * sigmoid(cpb_mlp(coords)) gathered per token pair (sigmoid before the gather is the
        same values, on fewer elements)."""
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        n = self.window_size[0] * self.window_size[1]
        return table[self.relative_position_index.view(-1)].view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, shift_size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): shifted-window attention over the whole map, then the output projection."""
        qkv_bias = self.qkv_bias()
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        bias = self.position_bias()
        B, H, W, C3 = qkv.shape
        (mh, mw), (sh, sw) = self.window_size, shift_size
        pad_h, pad_w = (-H) % mh, (-W) % mw
        shifted = bool(sh or sw)
        if not (pad_h or pad_w):
            out = window_attention(qkv, self.num_heads, self.window_size, shift_size, bias, self.logit_scale, impl)
        else:
            # timm: roll, zero-pad bottom/right, mask on the padded map. A zero token's qkv is the qkv bias.
            if shifted:
                qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2))
            fill = qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)
            fill = fill.to(qkv.dtype)
            if pad_w:
                qkv = torch.cat((qkv, fill.expand(B, H, pad_w, C3)), dim=2)
            if pad_h:
                qkv = torch.cat((qkv, fill.expand(B, pad_h, W + pad_w, C3)), dim=1)
            if shifted:  # window_attention rolls by (-sh, -sw) first: hand it the padded map rolled back
                qkv = torch.roll(qkv, shifts=(sh, sw), dims=(1, 2))
            out = window_attention(qkv, self.num_heads, self.window_size, shift_size, bias, self.logit_scale, impl)
            if shifted:
                out = torch.roll(out, shifts=(-sh, -sw), dims=(1, 2))
            out = out[:, :H, :W]
            if shifted:
                out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return self.proj_drop(self.proj(out))


class SwinTransformerV2Block(nn.Module):
    """Post-norm block: x + drop_path(norm1(attn(x))), then x + drop_path(norm2(mlp(x)))."""

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size, shift_size,
                 always_partition: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 pretrained_window_size=0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads = dim, num_heads
        self.target_shift_size = _pair(shift_size)
        self.always_partition = always_partition
        self.input_resolution = _pair(input_resolution)
        self.window_size, self.shift_size = self._calc_window_shift(_pair(window_size))
        self.attn_impl = "auto"
        self.attn = WindowAttention(dim, num_heads, self.window_size, _pair(pretrained_window_size), qkv_bias,
                                    proj_drop, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _calc_window_shift(self, window: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """timm's rule: the shift is half the window on odd blocks; unless always_partition, a stage whose
        resolution is <= the window uses window = resolution and no shift (per axis)."""
        shift = tuple(w // 2 for w in window) if any(self.target_shift_size) else (0, 0)
        if self.always_partition:
            return window, shift
        win = tuple(r if r <= w else w for r, w in zip(self.input_resolution, window))
        shift = tuple(0 if r <= w else s for r, w, s in zip(self.input_resolution, win, shift))
        return win, shift

    def set_input_size(self, feat_size, window_size, always_partition: bool | None = None) -> None:
        self.input_resolution = _pair(feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self._calc_window_shift(_pair(window_size))
        self.attn.set_window_size(self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.attn(x, self.shift_size, self.attn_impl)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: zero-pad odd maps, concatenate the 4 tokens (order of timm's reshape:
    (0,0), (1,0), (0,1), (1,1) as (row, col)), Linear(4C, out, no bias), LayerNorm (timm's `downsample.*`)."""

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim, self.out_dim = dim, out_dim
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = H + H % 2, W + W % 2
        # (B, H/2, row, W/2, col, C) -> (B, H/2, W/2, col, row, C): channel block index = 2 * col + row
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(self.reduction(x))


class SwinTransformerV2Stage(nn.Module):
    def __init__(self, dim: int, out_dim: int, resolution, depth: int, num_heads: int, window_size,
                 downsample: bool, always_partition: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 pretrained_window_size=0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.resolution = _pair(resolution)  # of the blocks (after the downsample)
        window_size = _pair(window_size)
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, norm_layer, **dd)
        else:
            if dim != out_dim:
                raise ValueError(f"SwinV2: a stage without downsample keeps its width ({dim} != {out_dim})")
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList([
            SwinTransformerV2Block(
                out_dim, self.resolution, num_heads, window_size,
                shift_size=0 if i % 2 == 0 else tuple(w // 2 for w in window_size),
                always_partition=always_partition, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                act_layer=act_layer, norm_layer=norm_layer, pretrained_window_size=pretrained_window_size, **dd)
            for i in range(depth)])

    def set_input_size(self, resolution, window_size, always_partition: bool | None = None) -> None:
        self.resolution = _pair(resolution)
        for blk in self.blocks:
            blk.set_input_size(self.resolution, window_size, always_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class ClassifierHead(nn.Module):
    """Global pool over (H, W) of NHWC features -> dropout -> fc (timm's `head.fc`; Identity if num_classes=0)."""

    POOLS = ("", "avg", "max", "avgmax", "catavgmax")

    def __init__(self, num_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type, device=device, dtype=dtype)

    def reset(self, num_classes: int, pool_type: str | None = None, device=None, dtype=None) -> None:
        if pool_type is not None:
            if pool_type not in self.POOLS:
                raise ValueError(f"SwinV2: global_pool={pool_type!r} is not one of {self.POOLS}")
            self.pool_type = pool_type
        self.num_features = self.in_features * (2 if self.pool_type == "catavgmax" else 1)
        self.fc = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0
                   else nn.Identity())

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool_type
        if p == "avg":
            return x.mean(dim=(1, 2))
        if p == "max":
            return x.amax(dim=(1, 2))
        if p == "avgmax":
            return 0.5 * (x.mean(dim=(1, 2)) + x.amax(dim=(1, 2)))
        if p == "catavgmax":
            return torch.cat((x.mean(dim=(1, 2)), x.amax(dim=(1, 2))), dim=-1)
        return x

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x))
        return x if pre_logits else self.fc(x)


_ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
                "silu": nn.SiLU, "swish": nn.SiLU}


def _act_layer(act_layer):
    if isinstance(act_layer, str):
        if act_layer not in _ACTIVATIONS:
            raise ValueError(f"SwinV2: act_layer={act_layer!r} is not one of {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[act_layer]
    return act_layer


# ------------------------------------------------------------------------------------------------- model
class SwinTransformerV2(nn.Module):
    """SwinV2 with timm's constructor arguments, parameter names and forward_features / forward_head / forward.

    Extra argument (not timm's): `attn_impl` ("auto" | "reference" | "triton" ...) is passed to every
    `window_attention` call; change it later with `set_attn_impl`.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim=96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size=7, always_partition: bool = False,
                 strict_img_size: bool = True, dynamic_img_size: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, act_layer="gelu",
                 norm_layer=nn.LayerNorm, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 attn_impl: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_drop_rate:
            raise ValueError("SwinV2: attn_drop_rate > 0 is not supported (window_attention has no attention "
                             "dropout); use proj_drop_rate / drop_path_rate")
        if isinstance(norm_layer, str):
            if norm_layer not in ("layernorm", "LayerNorm"):
                raise ValueError(f"SwinV2: norm_layer={norm_layer!r} is not supported (LayerNorm only)")
            norm_layer = nn.LayerNorm
        act_layer = _act_layer(act_layer)
        if dynamic_img_size:
            strict_img_size = False
        self.dynamic_img_size = not strict_img_size
        self.num_layers = len(depths)
        if len(num_heads) != self.num_layers or len(pretrained_window_sizes) != self.num_layers:
            raise ValueError(f"SwinV2: depths, num_heads and pretrained_window_sizes need one value per stage "
                             f"({len(depths)}, {len(num_heads)}, {len(pretrained_window_sizes)})")
        dims = ([int(d) for d in embed_dim] if isinstance(embed_dim, (tuple, list))
                else [int(embed_dim * 2 ** i) for i in range(self.num_layers)])
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.embed_dim = embed_dim
        self.num_features = dims[-1]
        self.attn_impl = attn_impl

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dims[0], strict_img_size, **dd)
        grid = self.patch_embed.grid_size
        windows = _stage_values(window_size, self.num_layers, "window_size")
        self._ref_window_sizes, self._ref_grid_size = windows, tuple(grid)
        total = sum(depths)
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, total, device="cpu")] if total else []
        self.feature_info = []
        layers, start, scale = [], 0, 1
        for i in range(self.num_layers):
            if i > 0:
                scale *= 2
            layers.append(SwinTransformerV2Stage(
                dims[max(i - 1, 0)], dims[i], self._stage_resolution(grid, i), depths[i], num_heads[i], windows[i],
                downsample=i > 0, always_partition=always_partition, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, drop_path=rates[start:start + depths[i]], act_layer=act_layer,
                norm_layer=norm_layer, pretrained_window_size=pretrained_window_sizes[i], **dd))
            start += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=max(self.patch_embed.patch_size) * scale,
                                          module=f"layers.{i}"))
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        self.set_attn_impl(attn_impl)
        self.init_weights()
        # timm-style metadata; create_swinv2 fills in the architecture's values
        self.pretrained_cfg: dict[str, Any] = {}
        self.model_args: dict[str, Any] = {}

    @staticmethod
    def _stage_resolution(grid, index: int) -> tuple[int, int]:
        """Blocks of stage i see ceil(grid / 2^i) (each patch merging zero-pads odd maps)."""
        return tuple(-(-g // 2 ** index) for g in grid)

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    # -------------------------------------------------------------------------------------- init / config
    def init_weights(self) -> None:
        """timm's init: Linear weights trunc_normal(std=0.02), biases 0; logit_scale log 10; q/v bias 0;
        the post-norm LayerNorms of every block start at weight 0, bias 0 (blocks start as identities)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.layers:
            for blk in stage.blocks:
                for norm in (blk.norm1, blk.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def set_attn_impl(self, impl: str) -> None:
        """Which `window_attention` implementation every block requests ("auto", "reference", "triton", ...)."""
        self.attn_impl = impl
        for stage in self.layers:
            for blk in stage.blocks:
                blk.attn_impl = impl

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (torch.utils.checkpoint, use_reentrant=False)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "cpb_mlp" in n or "logit_scale" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^absolute_pos_embed|patch_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+).downsample", (0,)),
                                                            (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                                                            (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        w = self.norm.weight
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, device=w.device, dtype=w.dtype)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool
        if self.pretrained_cfg:
            self.pretrained_cfg["num_classes"] = num_classes
        self.model_args["num_classes"] = num_classes
        if global_pool is not None:
            self.model_args["global_pool"] = global_pool

    def stage_windows(self) -> list[list[tuple[tuple[int, int], tuple[int, int]]]]:
        """(window, shift) of every block, per stage."""
        return [[(blk.window_size, blk.shift_size) for blk in stage.blocks] for stage in self.layers]

    def set_input_size(self, img_size=None, patch_size=None, window_size=None, window_ratio=None,
                       always_partition: bool | None = None) -> None:
        """timm's `set_input_size`: new image size and/or windows. Without window_size / window_ratio, each
        stage's window is scaled with the patch grid (max(1, w * new_grid // ref_grid)) as timm does, so a
        timm model resized the same way (e.g. by open_clip's force_image_size) has the same windows.
        Weights are untouched (SwinV2 has no size-dependent parameters)."""
        if patch_size is not None:
            raise NotImplementedError("SwinV2.set_input_size: changing the patch size (resampling the patch "
                                      "embedding) is not supported")
        if img_size is not None:
            self.patch_embed.set_img_size(img_size)
        grid = tuple(self.patch_embed.grid_size)
        if window_size is not None:
            windows = _stage_values(window_size, self.num_layers, "window_size")
        elif window_ratio is not None:
            ratios = (window_ratio,) * self.num_layers if isinstance(window_ratio, int) else tuple(window_ratio)
            if len(ratios) != self.num_layers:
                raise ValueError(f"window_ratio: expected one value per stage ({self.num_layers}), got {ratios}")
            windows = tuple(tuple(max(1, g // r) for g in grid) for r in ratios)
        else:
            windows = tuple(tuple(max(1, w * g // r) for w, g, r in zip(ws, grid, self._ref_grid_size))
                            for ws in self._ref_window_sizes)
        if window_size is not None or window_ratio is not None:
            self._ref_window_sizes, self._ref_grid_size = windows, grid
        for i, stage in enumerate(self.layers):
            stage.set_input_size(self._stage_resolution(grid, i), windows[i], always_partition)
        self.model_args["img_size"] = list(self.patch_embed.img_size)
        self.model_args["window_size"] = [list(w) for w in windows]
        if always_partition is not None:
            self.model_args["always_partition"] = always_partition
        if self.pretrained_cfg:
            self.pretrained_cfg["input_size"] = (self.in_chans, *self.patch_embed.img_size)
            self.pretrained_cfg["pool_size"] = self._stage_resolution(grid, self.num_layers - 1)

    # -------------------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H', W', num_features) normalised features (NHWC, as timm)."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's interface: stage outputs (NCHW) for `indices` (last n stages if int, all if None)."""
        if output_fmt != "NCHW":
            raise ValueError("SwinV2.forward_intermediates: output_fmt must be 'NCHW'")
        n = self.num_layers
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        last = max(take) if take else -1
        stages = list(self.layers)[:last + 1] if stop_early else list(self.layers)
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == n - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if len(stages) == n:
            x = self.norm(x)
        return x, intermediates

    def flops_per_image(self, img_size=None) -> float:
        """Forward FLOPs (2 x multiply-adds) of one image: patch embedding, every Linear applied to its tokens
        (attention over the window-padded map), attention scores and weighted sums, head."""
        H, W = _pair(img_size) if img_size is not None else self.patch_embed.img_size
        ph, pw = self.patch_embed.patch_size
        gh, gw = H // ph, W // pw
        conv = self.patch_embed.proj
        flops = 2.0 * gh * gw * conv.weight.numel()
        for i, stage in enumerate(self.layers):
            rh, rw = self._stage_resolution((gh, gw), i)
            if isinstance(stage.downsample, PatchMerging):
                flops += 2.0 * rh * rw * stage.downsample.reduction.weight.numel()
            for blk in stage.blocks:
                (mh, mw) = blk.window_size
                tokens, padded = rh * rw, (-(-rh // mh) * mh) * (-(-rw // mw) * mw)
                a = blk.attn
                flops += 2.0 * padded * a.qkv.weight.numel()          # qkv (on the padded map)
                flops += 2.0 * 2 * padded * mh * mw * a.dim          # q k^T and attn @ v
                flops += 2.0 * tokens * (a.proj.weight.numel() + blk.mlp.fc1.weight.numel()
                                         + blk.mlp.fc2.weight.numel())
        if isinstance(self.head.fc, nn.Linear):
            flops += 2.0 * self.head.fc.weight.numel()
        return flops


# ------------------------------------------------------------------------------------------------- registry
def _cfg(tag: str, **kwargs) -> dict:
    return {"tag": tag, "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "license": "mit", **kwargs}


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_PT12 = dict(pretrained_window_sizes=(12, 12, 12, 6))
_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_CFG_22K = dict(num_classes=21841, input_size=(3, 192, 192), pool_size=(6, 6))

# timm name -> (architecture arguments, pretrained_cfg); the same values as timm's registrations.
SWINV2_MODELS: dict[str, tuple[dict, dict]] = {
    "swinv2_tiny_window8_256": (dict(_T, window_size=8), _cfg("ms_in1k")),
    "swinv2_tiny_window16_256": (dict(_T, window_size=16), _cfg("ms_in1k")),
    "swinv2_small_window8_256": (dict(_S, window_size=8), _cfg("ms_in1k")),
    "swinv2_small_window16_256": (dict(_S, window_size=16), _cfg("ms_in1k")),
    "swinv2_base_window8_256": (dict(_B, window_size=8), _cfg("ms_in1k")),
    "swinv2_base_window16_256": (dict(_B, window_size=16), _cfg("ms_in1k")),
    "swinv2_base_window12to16_192to256": (dict(_B, window_size=16, **_PT12), _cfg("ms_in22k_ft_in1k")),
    "swinv2_base_window12to24_192to384": (dict(_B, window_size=24, **_PT12), _cfg("ms_in22k_ft_in1k", **_CFG_384)),
    "swinv2_large_window12to16_192to256": (dict(_L, window_size=16, **_PT12), _cfg("ms_in22k_ft_in1k")),
    "swinv2_large_window12to24_192to384": (dict(_L, window_size=24, **_PT12), _cfg("ms_in22k_ft_in1k", **_CFG_384)),
    "swinv2_base_window12_192": (dict(_B, window_size=12), _cfg("ms_in22k", **_CFG_22K)),
    "swinv2_large_window12_192": (dict(_L, window_size=12), _cfg("ms_in22k", **_CFG_22K)),
}


def list_swinv2_models() -> list[str]:
    return sorted(SWINV2_MODELS)


def _json_value(v):
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    return v


def create_swinv2(name: str, pretrained: bool = False, **kwargs) -> SwinTransformerV2:
    """A SwinV2 by timm's model name (optionally with timm's tag, e.g. 'swinv2_tiny_window8_256.ms_in1k') and
    timm's keyword arguments (num_classes, img_size, window_size, pretrained_window_sizes, drop_path_rate,
    global_pool, ...), plus `attn_impl`. Random weights: load timm's state dict to get trained ones.

    As timm: img_size, num_classes and in_chans default to the architecture's pretrained_cfg. The model carries
    `pretrained_cfg` / `default_cfg` (mean, std, input_size and num_classes of *this* model, not of the source
    checkpoint) and `model_args` (the keyword arguments that rebuild it from the timm name, JSON-ready).
    """
    arch, _, tag = name.partition(".")
    if arch not in SWINV2_MODELS:
        close = difflib.get_close_matches(arch, SWINV2_MODELS, n=4, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"known: {', '.join(list_swinv2_models())}"
        raise ValueError(f"unknown SwinV2 model {name!r}; {hint}")
    arch_args, cfg = SWINV2_MODELS[arch]
    if tag and tag != cfg["tag"]:
        raise ValueError(f"unknown tag {tag!r} for {arch}; timm's is {cfg['tag']!r}")
    if pretrained:
        raise ValueError("create_swinv2: pretrained=True is not supported (nothing downloads); load a timm state "
                         "dict with model.load_state_dict(...)")
    model_args = {k: v for k, v in kwargs.items() if k not in ("device", "dtype", "attn_impl")}
    args = dict(arch_args)
    args.setdefault("img_size", cfg["input_size"][-2:])
    args.setdefault("num_classes", cfg["num_classes"])
    args.update(kwargs)
    model = SwinTransformerV2(**args)
    grid = model.patch_embed.grid_size
    model.pretrained_cfg = dict(
        cfg, architecture=arch, input_size=(model.in_chans, *model.patch_embed.img_size),
        num_classes=model.num_classes,
        pool_size=SwinTransformerV2._stage_resolution(grid, model.num_layers - 1),
        fixed_input_size=not model.dynamic_img_size)
    model.model_args = {k: _json_value(v) for k, v in model_args.items()}
    return model

