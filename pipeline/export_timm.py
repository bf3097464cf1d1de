"""State dict + timm model name + timm kwargs -> a directory timm loads: config.json (timm's hub format) +
model.safetensors. Model-agnostic: nothing here knows SwinV2 (the ViT backbones reuse it).

Load the result with timm alone, either way:

    timm.create_model("local-dir:DIR", pretrained=True)                       # config.json's model_args
    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"),
                      **model_args)                                           # the same, spelled out

(the second drops the head unless num_classes is the architecture's default; pass num_classes in the overlay
too for another head size). Or `timm.create_model(arch, **model_args).load_state_dict(load_file(...))`, strict.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.export_target import export_directory

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# pretrained_cfg fields that describe where the source weights came from, not these weights
_SOURCE_KEYS = ("architecture", "url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "state_dict", "source", "tag",
                "custom_load", "license", "paper_ids", "paper_name", "notes", "origin_url", "test_input_size",
                "test_crop_pct", "test_pool_size", "label_offset")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    raise ValueError(f"export_timm: {v!r} ({type(v).__name__}) is not JSON-serialisable; pass timm kwargs as "
                     f"plain values")


def _reference_model(timm_name: str, kwargs: dict):
    """timm's model for these arguments, on the meta device when it can be built there (no memory, no init)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception:  # a model whose construction needs real tensors
        return timm.create_model(timm_name, pretrained=False, **kwargs)


def _classifier_keys(ref, state: Mapping[str, torch.Tensor]) -> list[str]:
    heads = ref.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [k for k in state if any(k.startswith(h + ".") for h in heads)]


def export_timm(model_or_state_dict, out_dir: str | Path, timm_name: str, timm_kwargs: Mapping | None = None,
                with_head: bool = True, pretrained_cfg: Mapping | None = None) -> Path:
    """Writes `out_dir` (built aside and renamed when complete: pipeline/export_target.py) with timm's config.json
    and model.safetensors for `timm.create_model(timm_name, **timm_kwargs)`.

    model_or_state_dict: an nn.Module (its state_dict()) or a state dict, in timm's key layout.
    timm_kwargs:         the keyword arguments that rebuild the architecture (img_size, window_size, ...);
                         recorded as config.json's model_args.
    with_head:           False drops the classifier (timm's pretrained_cfg["classifier"] keys) and exports a
                         feature extractor, num_classes=0.
    pretrained_cfg:      overrides for the recorded pretrained_cfg (e.g. the mean / std the weights were trained
                         with); input_size follows img_size, num_classes the exported head.

    The keys and shapes are checked against timm's own model for these arguments before anything is written.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    model_args = dict(timm_kwargs or {})
    for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype", "attn_impl"):
        model_args.pop(k, None)
    arch = timm_name.partition(".")[0]

    ref = _reference_model(timm_name, model_args)
    if not with_head:
        for k in _classifier_keys(ref, state):
            del state[k]
        model_args["num_classes"] = 0
        ref = _reference_model(timm_name, model_args)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"export_timm: state dict does not match timm's {arch}({model_args}): "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected if tuple(state[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"export_timm: shapes differ from timm's {arch}: {'; '.join(wrong[:5])}")

    cfg = {k: v for k, v in dict(ref.pretrained_cfg).items() if k not in _SOURCE_KEYS and v is not None}
    cfg.update(pretrained_cfg or {})
    img_size = model_args.get("img_size")
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], h, w)
        cfg.pop("pool_size", None)  # the source resolution's; no longer describes these weights
    in_chans = model_args.get("in_chans")
    if in_chans is not None:
        cfg["input_size"] = (in_chans, *cfg.get("input_size", (3, 224, 224))[1:])
    cfg["num_classes"] = ref.num_classes
    config = {"architecture": arch, "num_classes": ref.num_classes, "num_features": ref.num_features}
    global_pool = getattr(ref, "global_pool", None)
    if isinstance(global_pool, str) and global_pool:
        config["global_pool"] = global_pool
    config["pretrained_cfg"] = cfg
    config["model_args"] = model_args
    config = _jsonable(config)

    out = Path(out_dir)
    with export_directory(out, "timm") as tmp:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}  # no shared storage
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def export_clip_image_trunk(clip_model: torch.nn.Module, out_dir: str | Path) -> Path | None:
    """The image trunk of an open_clip model with a timm tower whose trunk records its timm name and arguments
    (our SwinV2: `pretrained_cfg["architecture"]`, `model_args`) as a timm directory, headless (open_clip
    resets the trunk's classifier), with the CLIP preprocessing mean / std. None for other towers."""
    trunk = getattr(getattr(clip_model, "visual", None), "trunk", None)
    arch = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture")
    model_args = getattr(trunk, "model_args", None)
    if trunk is None or not arch or model_args is None:
        return None
    overrides = {}
    pp = getattr(clip_model.visual, "preprocess_cfg", None) or {}
    for key in ("mean", "std", "interpolation"):
        if pp.get(key) is not None:
            overrides[key] = tuple(pp[key]) if isinstance(pp[key], (list, tuple)) else pp[key]
    return export_timm(trunk, out_dir, arch, model_args, with_head=getattr(trunk, "num_classes", 0) > 0,
                       pretrained_cfg=overrides)
