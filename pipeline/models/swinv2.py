"""SwinV2: timm's own model whose blocks compute attention with `kernels.window_attention.window_attention`.

`create_swinv2(name, **kwargs)` builds the model with `timm.create_model` (timm's classes, parameter names, init,
`set_input_size`, `forward_intermediates`, `group_matcher`, gradient checkpointing) and changes the class of every
`SwinTransformerV2Block` to `KernelSwinV2Block`, which overrides only the attention step `_attn`: the qkv
projection per token over the whole (B, H, W, C) map, one `window_attention(qkv, heads, window, shift, bias,
logit_scale)` call (the roll, the window partition, the -100 shift mask, the attention and the reverse; a PyTorch
reference or a Triton kernel, the model does not know which), the output projection. So timm state dicts load
strictly both ways and the outputs are timm's up to floating-point summation order (tests/models/test_swinv2.py).

Feature maps that are not a multiple of the window (e.g. img_size=200 with window 8). timm's convention, kept
exactly: roll the map by (-s, -s), zero-pad it at the bottom/right to a window multiple, build the shift mask on
the padded map, attend, crop, roll back. The padded tokens are real keys: their input is 0, so their qkv is the
qkv bias (q_bias, 0, v_bias) and they attend / are attended with the relative-position bias (mask 0 within
their region). We reproduce it with torch ops around the same `window_attention` call, no second attention
code path: roll qkv by (-s, -s), append rows/columns holding the qkv of a zero token, roll the padded map back by
(+s, +s) (so that the roll inside `window_attention` recreates the padded, rolled map; its mask is then built on
the padded size, as timm's), then undo the same steps on the output. Permutations and concatenations only.

Why this shape (issue 19). This file used to restate timm's SwinV2 (706 lines: patch embedding, blocks,
patch merging, stages, head, init, set_input_size, a registry of the model names) only to change the attention
step. Built from timm's classes it is a third of that, with the same kernel call (so the same attention FLOPs and
bytes) and the same padding code: its logits equal the restated version's bitwise, and a CPU forward+backward
(SwinV2-T layout at 72 px, embed 48, depths 2-2-2-2, batch 8, fp32, reference attention, 1 thread) took 1.00x and
0.98x the restated version's time in two runs (median of 20 interleaved rounds; quartiles 0.95-1.08x, 0.93-1.05x;
a 2-core machine shared at load ~18-20: `bench/swinv2_restated_vs_timm.py`). The GPU step is unmeasured.
The price is a dependency on timm internals: the block's `_attn(x) -> x` step and `_init_buffers`,
WindowAttention's attribute names, and `_model_args` (timm's record of the construction arguments, which
`model_args` exposes for the timm export).
`_adopt` checks each of them and raises naming what is missing, so a timm that changes them fails at build time
rather than silently running timm's own attention (written for timm 1.0.31, the lower bound in pyproject.toml;
tests/models/test_swinv2.py compares whole models with the installed timm and counts the window_attention calls).
The dependency is real: timm 1.0.29 has neither `_init_buffers` nor `_model_args` and fails that check. The
smaller file was kept anyway, because pip resolves the lower bound and a timm that moves fails loudly.

Not supported: attention-probability dropout (`attn_drop_rate` > 0; the window_attention contract has none);
`pretrained=True` (nothing downloads: load a state dict instead).
"""
from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import swin_transformer_v2 as timm_swinv2

from kernels.window_attention import window_attention

__all__ = ["SwinTransformerV2", "create_swinv2", "list_swinv2_models", "SWINV2_MODELS"]

TIMM_WRITTEN_FOR = "1.0.31"
# timm's swinv2_cr_* models are another architecture (other parameter names), not this one
SWINV2_MODELS: tuple[str, ...] = tuple(sorted(n for n in timm.list_models("swinv2_*") if not n.startswith("swinv2_cr")))
_TIMM_METHODS = ((timm_swinv2.SwinTransformerV2Block, ("_attn", "_init_buffers", "set_input_size")),
                 (timm_swinv2.SwinTransformerV2, ("set_input_size", "reset_classifier")))
_BLOCK_ATTRS = ("window_size", "shift_size", "attn", "attn_mask")
_ATTN_ATTRS = ("qkv", "q_bias", "k_bias", "v_bias", "cpb_mlp", "relative_coords_table", "relative_position_index",
               "logit_scale", "num_heads", "proj", "proj_drop", "attn_drop")


def _json_value(v):
    return [_json_value(x) for x in v] if isinstance(v, (tuple, list)) else v


class KernelSwinV2Block(timm_swinv2.SwinTransformerV2Block):
    """timm's block (post-norm: x + norm1(attn(x)), x + norm2(mlp(x))) whose attention step is `window_attention`."""

    attn_impl = "auto"  # passed to window_attention: "auto" | "reference" | "triton"

    def _init_buffers(self) -> None:
        """No precomputed shift mask: window_attention builds it (timm's would be an unused (windows, N, N) buffer)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): shifted-window attention over the whole map and the output projection
        (timm's roll + pad + partition + WindowAttention + reverse + crop + roll)."""
        a = self.attn
        qkv_bias = None if a.q_bias is None else torch.cat((a.q_bias, a.k_bias, a.v_bias))
        qkv = F.linear(x, a.qkv.weight, qkv_bias)
        # (heads, N, N) continuous position bias; sigmoid before the gather is timm's values on fewer elements
        table = 16 * torch.sigmoid(a.cpb_mlp(a.relative_coords_table).view(-1, a.num_heads))
        n = self.window_size[0] * self.window_size[1]
        bias = table[a.relative_position_index.view(-1)].view(n, n, a.num_heads).permute(2, 0, 1).contiguous()
        B, H, W, C3 = qkv.shape
        (mh, mw), (sh, sw) = self.window_size, self.shift_size
        pad_h, pad_w = (-H) % mh, (-W) % mw
        shifted = bool(sh or sw)
        if not (pad_h or pad_w):
            out = window_attention(qkv, a.num_heads, self.window_size, self.shift_size, bias, a.logit_scale,
                                   self.attn_impl)
            return a.proj_drop(a.proj(out))
        # timm: roll, zero-pad bottom/right, mask on the padded map. A zero token's qkv is the qkv bias.
        if shifted:
            qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2))
        fill = (qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)).to(qkv.dtype)
        if pad_w:
            qkv = torch.cat((qkv, fill.expand(B, H, pad_w, C3)), dim=2)
        if pad_h:
            qkv = torch.cat((qkv, fill.expand(B, pad_h, W + pad_w, C3)), dim=1)
        if shifted:  # window_attention rolls by (-sh, -sw) first: hand it the padded map rolled back
            qkv = torch.roll(qkv, shifts=(sh, sw), dims=(1, 2))
        out = window_attention(qkv, a.num_heads, self.window_size, self.shift_size, bias, a.logit_scale,
                               self.attn_impl)
        if shifted:
            out = torch.roll(out, shifts=(-sh, -sw), dims=(1, 2))
        out = out[:, :H, :W]
        if shifted:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return a.proj_drop(a.proj(out))


class SwinTransformerV2(timm_swinv2.SwinTransformerV2):
    """timm's SwinTransformerV2 (built by timm, see `create_swinv2`) with `KernelSwinV2Block`s, plus the attention
    switch `set_attn_impl`, `stage_windows` and this model's metadata: `pretrained_cfg` /
    `default_cfg` describe *this* model (input_size, num_classes, pool_size), `model_args` the keyword arguments
    that rebuild it from its timm name (JSON-ready).
    """

    def set_attn_impl(self, impl: str) -> None:
        """Which `window_attention` implementation every block requests ("auto", "reference", "triton")."""
        self.attn_impl = impl
        for stage in self.layers:
            for blk in stage.blocks:
                blk.attn_impl = impl

    def stage_windows(self) -> list[list[tuple[tuple[int, int], tuple[int, int]]]]:
        """(window, shift) of every block, per stage."""
        return [[(tuple(blk.window_size), tuple(blk.shift_size)) for blk in stage.blocks] for stage in self.layers]

    @staticmethod
    def _stage_resolution(grid, index: int) -> tuple[int, int]:
        """Blocks of stage i see ceil(grid / 2^i) (each patch merging zero-pads odd maps)."""
        return tuple(-(-g // 2 ** index) for g in grid)

    @property
    def model_args(self) -> dict:
        """timm's record of the construction arguments (create_model's kwargs, updated by set_input_size and
        reset_classifier), JSON-ready."""
        return {k: _json_value(v) for k, v in self._model_args.items()}

    def _describe_self(self) -> None:
        grid = self.patch_embed.grid_size
        self.pretrained_cfg = self.default_cfg = dict(
            self.pretrained_cfg, input_size=(self.in_chans, *self.patch_embed.img_size), num_classes=self.num_classes,
            pool_size=self._stage_resolution(grid, len(self.layers) - 1), fixed_input_size=not self.dynamic_img_size)

    def set_input_size(self, *args, **kwargs) -> None:
        """timm's (windows scaled with the patch grid unless given), and this model's metadata updated."""
        super().set_input_size(*args, **kwargs)
        self._describe_self()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        pool = {} if global_pool is None else {"global_pool": global_pool}
        self._model_args = dict(self._model_args, num_classes=num_classes, **pool)
        self._describe_self()


def _adopt(model: nn.Module, attn_impl: str) -> SwinTransformerV2:
    """Turns timm's SwinTransformerV2 into ours in place (class change only: the modules, parameters and
    buffers stay timm's). Raises if timm's classes no longer have what `KernelSwinV2Block` relies on."""
    blocks = [blk for stage in getattr(model, "layers", ()) for blk in getattr(stage, "blocks", ())]
    missing = [f"{cls.__name__}.{m}" for cls, names in _TIMM_METHODS for m in names if not hasattr(cls, m)]
    if type(model) is not timm_swinv2.SwinTransformerV2 or not blocks:
        missing.append(f"model of class SwinTransformerV2 with layers[*].blocks (got {type(model).__name__})")
    if not hasattr(model, "_model_args"):
        missing.append("SwinTransformerV2._model_args (set by timm.create_model)")
    for blk in blocks:
        if type(blk) is not timm_swinv2.SwinTransformerV2Block:
            missing.append(f"blocks of class SwinTransformerV2Block (got {type(blk).__name__})")
        missing += [f"SwinTransformerV2Block.{a}" for a in _BLOCK_ATTRS if not hasattr(blk, a)]
        missing += [f"WindowAttention.{a}" for a in _ATTN_ATTRS if not hasattr(getattr(blk, "attn", None), a)]
    if missing:
        raise RuntimeError(f"pipeline.models.swinv2 was written for timm {TIMM_WRITTEN_FOR}'s SwinV2; timm "
                           f"{timm.__version__} lacks: {', '.join(dict.fromkeys(missing))}")
    if any(blk.attn.attn_drop.p > 0 for blk in blocks):
        raise ValueError("SwinV2: attn_drop_rate > 0 is not supported (window_attention has no attention "
                         "dropout); use proj_drop_rate / drop_path_rate")
    for blk in blocks:
        blk.__class__ = KernelSwinV2Block
        blk.attn_mask = None  # timm's precomputed shift mask; window_attention builds its own
    model.__class__ = SwinTransformerV2
    model.set_attn_impl(attn_impl)
    model._describe_self()
    return model


def list_swinv2_models() -> list[str]:
    return list(SWINV2_MODELS)


def create_swinv2(name: str, pretrained: bool = False, attn_impl: str = "auto", **kwargs) -> SwinTransformerV2:
    """A SwinV2 by timm's model name (optionally with timm's tag, e.g. 'swinv2_tiny_window8_256.ms_in1k') and
    timm's keyword arguments (num_classes, img_size, window_size, pretrained_window_sizes, drop_path_rate,
    global_pool, device, ...), plus `attn_impl`. Random weights: load timm's state dict to get trained ones."""
    arch, _, tag = name.partition(".")
    if arch not in SWINV2_MODELS:
        close = difflib.get_close_matches(arch, SWINV2_MODELS, n=4, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"known: {', '.join(SWINV2_MODELS)}"
        raise ValueError(f"unknown SwinV2 model {name!r}; {hint}")
    if tag and name not in timm.list_pretrained(name):
        raise ValueError(f"unknown tag {tag!r} for {arch}; timm's: {', '.join(timm.list_pretrained(arch + '.*'))}")
    if pretrained:
        raise ValueError("create_swinv2: pretrained=True is not supported (nothing downloads); load a timm state "
                         "dict with model.load_state_dict(...)")
    return _adopt(timm.create_model(name, pretrained=False, **kwargs), attn_impl)
