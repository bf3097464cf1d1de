"""Vision backbones for supervised and masked-image pretraining: timm ViTs and our SwinV2, by name.

`create_backbone(name, **kwargs)` builds
- `vit_*` names with `timm.create_model(name, pretrained=False, **kwargs)`: timm's own class, so the state dict
  is timm's and export needs no key mapping (ViT-H/14 = `vit_huge_patch14_224`: 32 layers, width 1280, MLP 5120,
  16 heads; 630,764,800 parameters without a head, 632,045,800 with a 1000-class head);
- `swinv2_*` names with `pipeline.models.swinv2.create_swinv2(name, **kwargs)` (timm-identical parameter names);
- the demo presets in `PRESETS` (small models for the 64 px demo data on a CPU), which expand to one of the above.

Nothing downloads: weights are random. Keyword arguments override a preset's.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import UserError

# name -> (architecture name, constructor kwargs). The demo data: 64 px pictures, 40 classes.
PRESETS: dict[str, tuple[str, dict]] = {
    # 64 px / patch 8 = 8x8 tokens + cls, width 128, 4 blocks, 4 heads: 0.83M parameters, 0.11 GFLOPs
    "demo_vit": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                              num_classes=40)),
    # 64 px / patch 4 = 16x16 tokens, windows of 4, stages 16->8->4->2 (stride 32), widths 32..256: 2.3M, 0.06 GFLOPs
    "demo_swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                                                    num_heads=(1, 2, 4, 8), num_classes=40)),
}


class BackboneNameError(UserError, ValueError):
    pass


def resolve_backbone(name: str, **kwargs) -> tuple[str, dict]:
    """(architecture name, kwargs) after preset expansion; raises BackboneNameError with a one-line reason.
    Builds nothing: the check to run before a process group starts."""
    if name in PRESETS:
        arch, base = PRESETS[name]
        return arch, {**base, **kwargs}
    if name.startswith("vit_"):
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=3)
            raise BackboneNameError(f"model.name={name!r} is not a timm ViT; "
                                    f"close matches: {', '.join(close) or 'none'}")
        return name, dict(kwargs)
    if name.startswith("swinv2_"):
        from pipeline.models.swinv2 import list_swinv2_models

        known = list_swinv2_models()
        if name.partition(".")[0] not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise BackboneNameError(f"model.name={name!r} is not a SwinV2; close matches: {', '.join(close) or 'none'}")
        return name, dict(kwargs)
    raise BackboneNameError(f"model.name={name!r} is not a backbone; use a timm vit_* name, a swinv2_* name or "
                            f"one of {', '.join(PRESETS)}")


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A randomly initialised backbone with timm's parameter layout; see the module docstring for the names."""
    arch, kw = resolve_backbone(name, **kwargs)
    if arch.startswith("vit_"):
        import timm

        return timm.create_model(arch, pretrained=False, **kw)
    if arch.startswith("swinv2_"):
        from pipeline.models.swinv2 import create_swinv2

        return create_swinv2(arch, **kw)
    raise BackboneNameError(f"model.name={name!r}: preset architecture {arch!r} is neither vit_* nor swinv2_*")


def backbone_kind(model: nn.Module) -> str:
    """'vit' (timm VisionTransformer layout: patch_embed, _pos_embed, blocks, norm) or 'swinv2' (patch_embed,
    layers[*].downsample/blocks, norm)."""
    if hasattr(model, "blocks") and hasattr(model, "_pos_embed"):
        return "vit"
    if hasattr(model, "layers") and hasattr(model, "patch_embed"):
        return "swinv2"
    raise ValueError(f"{type(model).__name__} is neither a timm ViT nor a SwinV2 backbone")


@dataclass(frozen=True)
class BackboneInfo:
    kind: str  # 'vit' | 'swinv2'
    img_size: tuple[int, int]
    patch_size: int  # of the patch embedding (model patch)
    grid_size: tuple[int, int]  # tokens after the patch embedding
    stride: int  # pixels per position of the final feature map (ViT: patch; SwinV2: patch * 2^(stages-1))
    num_features: int  # channels of the final feature map / pooled feature
    in_chans: int
    depths: tuple[int, ...]  # blocks per stage (ViT: one stage)


def backbone_info(model: nn.Module) -> BackboneInfo:
    kind = backbone_kind(model)
    pe = model.patch_embed
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else int(pe.patch_size)
    grid = tuple(int(g) for g in pe.grid_size)
    img = tuple(int(s) for s in pe.img_size) if isinstance(pe.img_size, (tuple, list)) else (pe.img_size,) * 2
    in_chans = pe.proj.in_channels
    if kind == "vit":
        return BackboneInfo(kind, img, patch, grid, patch, model.num_features, in_chans, (len(model.blocks),))
    depths = tuple(len(stage.blocks) for stage in model.layers)
    return BackboneInfo(kind, img, patch, grid, patch * 2 ** (len(depths) - 1), model.num_features, in_chans, depths)


def backbone_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, num_features): the pooled, pre-logits feature that kNN / linear probes use (timm's
    forward_features then forward_head(pre_logits=True): the cls token after the final norm for ViT, the
    average of the final normalised map for SwinV2)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Initialises a backbone from a pretraining checkpoint's weights (e.g. SimMIM's, under `encoder.`; a plain
    timm / exported state dict works as is) for fine-tuning. A `module.` / `encoder.` prefix is stripped; the
    pretraining-only tensors (mask_token, decoder.*) are ignored; a ViT's pos_embed is resampled to this model's
    grid (timm's resample_abs_pos_embed); the classifier is kept from `model` when the shapes differ or it is
    absent. SwinV2 needs nothing for a new window size: its relative-position tables are non-persistent buffers
    recomputed from the window (set pretrained_window_sizes on the new model, as the SwinV2 recipe does).
    Returns {"loaded", "kept", "ignored"}; raises ValueError if any other parameter is missing, mismatched or
    unexpected."""
    state = dict(state_dict)
    for prefix in ("module.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    own = model.state_dict()
    ignored = sorted(k for k in state if k not in own)
    state = {k: v for k, v in state.items() if k in own}
    if backbone_kind(model) == "vit" and "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix_tokens)
    head = [k for k in own if k.startswith("head.")]
    kept = [k for k in head if k not in state or state[k].shape != own[k].shape]
    for k in kept:
        state.pop(k, None)
    bad = [k for k in own if k not in state and k not in kept]
    bad += [k for k in state if state[k].shape != own[k].shape]
    # beyond what pretraining alone has (mask token, pixel decoder) or a classifier this model lacks, a tensor
    # the model has no place for means another architecture (e.g. more blocks)
    bad += [k for k in ignored if k != "mask_token" and not k.startswith(("decoder.", "head."))]
    if bad:
        raise ValueError(f"pretrained weights do not fit the backbone: {len(bad)} missing or mismatched, e.g. "
                         f"{', '.join(bad[:3])}")
    model.load_state_dict(state, strict=False)
    return {"loaded": sorted(state), "kept": sorted(kept), "ignored": ignored}


def backbone_transforms(model: nn.Module, train: bool, **kwargs):
    """timm's image transform for this backbone at *its* input size (timm's ViT keeps the architecture's 224 in
    pretrained_cfg when built with img_size=...), its mean/std and interpolation. kwargs go to
    timm.data.create_transform: e.g. scale=(0.08, 1.0), ratio, hflip, color_jitter, auto_augment
    ('rand-m9-mstd0.5-inc1'), re_prob, crop_pct. SimMIM pretraining: scale=(0.67, 1.0), color_jitter=0."""
    from timm.data import create_transform, resolve_data_config

    info = backbone_info(model)
    data_cfg = resolve_data_config({}, model=model)
    data_cfg["input_size"] = (info.in_chans, *info.img_size)
    data_cfg.update({k: kwargs.pop(k) for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")
                     if k in kwargs})
    return create_transform(**data_cfg, is_training=train, **kwargs)
