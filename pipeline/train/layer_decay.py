"""Layer-wise learning-rate decay (BEiT / MAE / SimMIM fine-tuning) for timm ViTs and SwinV2 backbones.

Each parameter gets a layer id, and its learning rate is base_lr * layer_decay ** (max_id - id):
- ViT (depth L): patch_embed, cls_token, pos_embed, reg_token, norm_pre (and a SimMIM mask_token) -> 0;
  blocks.i -> i + 1; everything after the blocks (norm, fc_norm, head, attn_pool, decoders) -> L + 1.
- SwinV2 (depths d_0..d_{S-1}, D = sum d): patch_embed, absolute_pos_embed, mask_token -> 0;
  layers.s.blocks.j -> d_0 + ... + d_{s-1} + j + 1; layers.s.downsample (the patch merging at the start of
  stage s in timm's layout) -> d_0 + ... + d_{s-1}, the id of the block before it, as the SimMIM / Swin
  fine-tuning code gives the same merging layer at the end of stage s-1; norm, head -> D + 1.
A model that wraps a backbone as `.encoder` (SimMIM) is handled through the `encoder.` prefix.
- CLIP (open_clip), each tower decayed from its own top: image ViT: conv1, class_embedding, positional_embedding,
  ln_pre -> 0; transformer.resblocks.i -> i + 1; ln_post, proj, attn_pool -> L + 1; a timm image trunk as the
  backbone above, its head on top; text: token_embedding, positional_embedding, cls_emb -> 0; resblocks.i ->
  i + 1; ln_final, text_projection -> L + 1; logit_scale / logit_bias -> the top (lr x 1). Tower ids are shifted
  so that every tower's top lands on the common maximum.

Weight decay is off for 1-d parameters (norms, biases, logit scales reshaped to 1-d), `*.bias`, the model's own
`no_weight_decay()` names (timm ViT: pos_embed, cls_token; SwinV2: cpb_mlp.*, logit_scale) and
`no_weight_decay_names` (a full name, or a dotted suffix of one).

The groups carry their final "lr" (base_lr x lr_scale), so the trainer's LambdaLR warmup/cosine multiplies
each group's own rate; "lr_scale" and "layer_id" are informational.

Why not timm's `timm.optim.param_groups_layer_decay` (the models' `group_matcher`): measured parameter by
parameter (tests/train/test_layer_decay_vs_timm.py), timm's groups match ours except in two places, one decay
step apart each: the final `norm` sits with the last block in timm, with the head in the MAE / BEiT / SimMIM
fine-tuning recipes; SwinV2's patch merging sits with the first block of its stage in timm, with the last
block of the stage before in Swin / SimMIM fine-tuning. The first would take replacing timm's ViT class's own
`group_matcher`; the second no regex matcher can express (the merging's id is the previous stage's). Nor does
timm group a SimMIM wrapper (no `group_matcher`: it falls back to fixed-size chunks of parameter names) or
open_clip's own ViT / text towers (not timm models), and it has no per-tower alignment of a two-tower model.
So the layer ids stay here; they are a few regexes.
"""
from __future__ import annotations

import re

from torch import nn

from pipeline.models.backbone import backbone_info

_VIT_STEM = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed", "norm_pre", "mask_token")
_SWIN_STEM = ("patch_embed", "absolute_pos_embed", "mask_token")


def vit_layer_id(name: str, depth: int) -> int:
    if name.split(".")[0] in _VIT_STEM:
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def swinv2_layer_id(name: str, depths: tuple[int, ...]) -> int:
    if name.split(".")[0] in _SWIN_STEM:
        return 0
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(depths[:stage]) + block + 1
    m = re.match(r"layers\.(\d+)\.downsample\.", name)
    if m:
        return sum(depths[:int(m.group(1))])
    return sum(depths) + 1


def _split_encoder(model: nn.Module) -> tuple[nn.Module, str]:
    """(backbone, prefix of its parameter names in `model`)."""
    enc = getattr(model, "encoder", None)
    if isinstance(enc, nn.Module) and hasattr(enc, "patch_embed"):
        return enc, "encoder."
    return model, ""


_CLIP_VISION_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
_CLIP_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb")


def _tower_id(name: str, stem: tuple[str, ...], depth: int) -> int:
    if name.split(".")[0] in stem:
        return 0
    m = re.match(r"transformer\.resblocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def is_clip(model: nn.Module) -> bool:
    return hasattr(model, "visual") and hasattr(model, "logit_scale")


def clip_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, max id) for an open_clip model; see the module docstring."""
    visual = model.visual
    towers: list[tuple[str, dict[str, int], int]] = []  # (prefix, ids within the tower, the tower's max id)
    if hasattr(visual, "trunk"):  # open_clip's TimmModel: a timm ViT / SwinV2 trunk and a projection head
        trunk_ids, trunk_max = layer_ids(visual.trunk)
        ids = {f"trunk.{n}": i for n, i in trunk_ids.items()}
        ids.update({n: trunk_max for n, _ in visual.named_parameters() if not n.startswith("trunk.")})
        towers.append(("visual.", ids, trunk_max))
    elif hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        depth = len(visual.transformer.resblocks)
        towers.append(("visual.", {n: _tower_id(n, _CLIP_VISION_STEM, depth) for n, _ in visual.named_parameters()},
                       depth + 1))
    else:
        raise ValueError(f"train.layer_decay: no layer order for the image tower {type(visual).__name__} "
                         f"(open_clip ViT or timm ViT / SwinV2 towers only)")
    text = getattr(model, "text", None)
    text_prefix = "text." if text is not None else ""
    text = text if text is not None else model
    blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"train.layer_decay: no layer order for the text tower {type(text).__name__} "
                         f"(open_clip's text transformer only)")
    depth = len(blocks)
    text_ids = {n: _tower_id(n, _CLIP_TEXT_STEM, depth) for n, _ in text.named_parameters()
                if not n.startswith("visual.") and not n.startswith("logit_")}
    towers.append((text_prefix, text_ids, depth + 1))
    max_id = max(m for _, _, m in towers)
    ids = {}
    for prefix, tower_ids, tower_max in towers:
        ids.update({prefix + n: i + max_id - tower_max for n, i in tower_ids.items()})
    for name, _ in model.named_parameters():
        ids.setdefault(name, max_id)  # logit_scale, logit_bias
    return ids, max_id


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, max id) for a ViT or SwinV2 backbone (or a SimMIM wrapping one), or CLIP."""
    if is_clip(model):
        return clip_layer_ids(model)
    backbone, prefix = _split_encoder(model)
    info = backbone_info(backbone)
    if info.kind == "vit":
        depth = info.depths[0]
        fn, max_id = (lambda n: vit_layer_id(n, depth)), depth + 1
    else:
        fn, max_id = (lambda n: swinv2_layer_id(n, info.depths)), sum(info.depths) + 1
    ids = {}
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            ids[name] = fn(name[len(prefix):])
        else:  # the wrapper's own: its mask token sits with the patch embedding, its decoder on top
            ids[name] = 0 if name == "mask_token" else max_id
    return ids, max_id


def _no_decay_names(model: nn.Module, extra) -> set[str]:
    names = set(extra)
    if hasattr(model, "no_weight_decay"):
        names |= set(model.no_weight_decay())
    backbone, prefix = _split_encoder(model)
    if prefix and hasattr(backbone, "no_weight_decay"):
        names |= {prefix + n for n in backbone.no_weight_decay()}
    return names


def _matches(name: str, names: set[str]) -> bool:
    return name in names or any(name.endswith("." + n) for n in names)


def layer_decay_param_groups(model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
                             no_weight_decay_names=(), no_weight_decay_fn=None) -> list[dict]:
    """AdamW parameter groups, one per (layer id, decayed or not) that has trainable parameters, in layer
    order: {"params", "weight_decay", "lr", "lr_scale", "layer_id"}. layer_decay=1 gives plain groups.
    `no_weight_decay_fn(name, param)`, when given, replaces the weight-decay rule above (CLIP keeps its own)."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    ids, max_id = layer_ids(model)
    skip = _no_decay_names(model, no_weight_decay_names)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay_fn is not None:
            no_decay = no_weight_decay_fn(name, p)
        else:
            no_decay = p.ndim <= 1 or name.endswith(".bias") or _matches(name, skip)
        lid = ids[name]
        scale = layer_decay ** (max_id - lid)
        key = (lid, not no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": base_lr * scale, "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def param_group_summary(groups: list[dict]) -> list[tuple[int, float, float, int]]:
    """[(layer_id, lr_scale, weight_decay, parameter count)] for logging."""
    return [(g["layer_id"], g["lr_scale"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in groups]

