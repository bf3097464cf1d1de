"""CLIP models from open_clip model configs: open_clip's built-in names plus our configs/model/*.json.

The model is open_clip's own class, so its state dict is open_clip's and export needs no key mapping.
A config whose image tower is a timm SwinV2 (`vision_cfg.timm_model_name: swinv2_*`) gets our SwinV2
(pipeline/models/swinv2.py, attention through kernels.window_attention) in place of timm's trunk: same
parameter names and values, so the state dict, and the exported directory, are still plain open_clip + timm.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path

import open_clip
import torch

from pipeline.errors import UserError

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


class ModelNameError(UserError, ValueError):
    pass


def register_model_configs() -> None:
    """Makes configs/model/*.json (e.g. clip-tiny) known to open_clip by their file names."""
    if MODEL_CONFIG_DIR.is_dir() and "clip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_model_name(name: str) -> None:
    """model.name is an architecture; weights come from model.pretrained (a local copy: nothing downloads)."""
    register_model_configs()
    if name.startswith("hf-hub:"):
        raise ModelNameError(f"model.name={name!r} would download from the Hugging Face hub; fetch the repository "
                             f"once (`huggingface-cli download {name.removeprefix('hf-hub:')} --local-dir DIR`) and "
                             f"set model.name to its architecture and model.pretrained=DIR")
    if name.startswith("local-dir:"):
        raise ModelNameError(f"model.name={name!r}: name the architecture (e.g. {_local_dir_arch(name)}) and set "
                             f"model.pretrained={name.removeprefix('local-dir:')}")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"close matches: {', '.join(close)}" if close else f"{len(known)} known, e.g. ViT-B-16, ViT-L-14, ViT-H-14"
        raise ModelNameError(f"model.name={name!r} is not an open_clip model config; {hint}")


def _local_dir_arch(name: str) -> str:
    """The architecture a `local-dir:` directory was exported from (our exports record it), else a placeholder."""
    import json

    cfg = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
    try:
        return json.loads(cfg.read_text())["pipeline"]["model_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "ViT-B-16"


def loss_init(loss_name: str, init_scale: float = 10.0, init_bias: float = -10.0) -> dict:
    """Model constructor arguments a loss needs: SigLIP starts at t' = log(init_scale) with a learnable bias b =
    init_bias (the paper's log 10 and -10 by default; `loss.siglip_init_*` in a run config)."""
    if loss_name != "siglip":
        return {}
    return {"init_logit_scale": math.log(init_scale), "init_logit_bias": float(init_bias)}


def _patch_dropout_kwargs(patch_dropout: float) -> dict:
    return {"force_patch_dropout": patch_dropout} if patch_dropout else {}


def build_open_clip(name: str, loss_name: str = "clip", patch_dropout: float = 0.0,
                    device: str = "cpu") -> torch.nn.Module:
    """The bare open_clip model (random weights, no transforms); device="meta" allocates nothing (shape checks)."""
    check_model_name(name)
    with torch.device(device):
        return open_clip.create_model(name, pretrained=None, output_dict=True, device=device,
                                      **loss_init(loss_name), **_patch_dropout_kwargs(patch_dropout))


def create_clip(name: str, activation_checkpointing: bool = False, loss_name: str = "clip",
                patch_dropout: float = 0.0, init_scale: float = 10.0, init_bias: float = -10.0):
    """Returns (model, train_transform, eval_transform, tokenizer); weights are random (nothing downloads).
    patch_dropout: FLIP's fraction of image patches dropped in training (open_clip's PatchDropout; 0 = off).
    `init_scale` / `init_bias`: SigLIP's exp(t') and b at initialisation (ignored for other losses)."""
    check_model_name(name)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True,
                                                                     **loss_init(loss_name, init_scale, init_bias),
                                                                     **_patch_dropout_kwargs(patch_dropout))
    swap_swinv2_trunk(model)
    if activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


def swinv2_trunk_name(model: torch.nn.Module) -> str | None:
    """timm's model name of the CLIP model's image trunk if it is a SwinV2 (timm's or ours), else None."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    arch = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture", "") if trunk is not None else ""
    return arch if arch.startswith("swinv2_") else None


def swap_swinv2_trunk(model: torch.nn.Module) -> bool:
    """Replaces open_clip's timm SwinV2 trunk (`model.visual.trunk`) by ours, with the same weights.

    Our trunk keeps the timm trunk's head (num_classes, global_pool: open_clip resets it to 0 / pool) and
    stochastic depth, and runs at the tower's `image_size` (open_clip's TimmModel records it but builds the timm
    model at the architecture's own size): when they differ, the windows follow timm's `set_input_size` rule,
    i.e. what `open_clip.create_model_and_transforms(..., force_image_size=image_size)` does to a timm trunk, so
    the export loads in plain open_clip + timm with that argument. Returns whether a trunk was replaced."""
    from pipeline.models.swinv2 import SwinTransformerV2, create_swinv2

    arch = swinv2_trunk_name(model)
    old = model.visual.trunk if arch else None
    if old is None or isinstance(old, SwinTransformerV2):
        return False
    drop_path = round(float(getattr(old.layers[-1].blocks[-1].drop_path1, "drop_prob", 0.0)), 6)
    new = create_swinv2(arch, num_classes=old.num_classes, global_pool=old.global_pool, drop_path_rate=drop_path)
    param = next(old.parameters())
    new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    image_size = tuple(model.visual.image_size)
    if image_size != tuple(new.patch_embed.img_size):
        new.set_input_size(img_size=image_size)
    model.visual.trunk = new
    return True


def open_clip_load_kwargs(model: torch.nn.Module) -> dict:
    """Arguments plain `open_clip.create_model_and_transforms('local-dir:...')` needs to rebuild this model:
    a SwinV2 tower at another size than its timm architecture needs force_image_size (open_clip does not pass
    image_size to timm)."""
    arch = swinv2_trunk_name(model)
    if arch is None:
        return {}
    import timm

    native = tuple(timm.models.get_pretrained_cfg(arch).input_size[-2:])
    size = tuple(model.visual.image_size)
    if size == native:
        return {}
    return {"force_image_size": size[0] if size[0] == size[1] else list(size)}


def promote_scalar_params(module: torch.nn.Module) -> None:
    """Turns 0-d parameters (open_clip's logit_scale / logit_bias) into shape (1,): DeepSpeed's initial
    broadcast views every parameter as bytes, which fails for 0-d tensors. `load_state_dict_reshaped`
    undoes it when weights go back into an unmodified open_clip model."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(sub, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def load_state_dict_reshaped(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that reconciles (1,) <-> () shapes of scalar parameters."""
    own = module.state_dict()
    fixed = {k: (v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() == 1 else v)
             for k, v in state.items()}
    module.load_state_dict(fixed, strict=True)


def clip_step_flops(model: torch.nn.Module) -> int:
    """FLOPs of one image-text pair in a training step: each tower's forward counted on the meta device
    (pipeline/train/flops.py), x3 for a tower that trains, x1 for a locked one (model.lock_image / lock_text).
    The contrastive loss is left out (negligible, see there)."""
    from pipeline.train.flops import forward_flops, step_flops, trains

    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    owner = model if getattr(model, "context_length", None) else model.text  # CLIP or CustomTextCLIP (SigLIP)
    images = torch.empty(1, 3, *size, device="meta")
    tokens = torch.zeros(1, owner.context_length, dtype=torch.long, device="meta")
    image = forward_flops(model, images, call=lambda m, x: m.encode_image(x))
    text = forward_flops(model, tokens, call=lambda m, t: m.encode_text(t))
    text_params = [p for n, p in model.named_parameters() if not n.startswith(("visual.", "logit_"))]
    return step_flops(image, trains(model.visual.parameters())) + step_flops(text, trains(text_params))
