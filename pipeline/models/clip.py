"""CLIP models from open_clip model configs: open_clip's built-in names plus our configs/model/*.json.

The model is open_clip's own class, so its state dict is open_clip's and export needs no key mapping.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path

import open_clip
import torch

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


class ModelNameError(ValueError):
    pass


def register_model_configs() -> None:
    """Makes configs/model/*.json (e.g. clip-tiny) known to open_clip by their file names."""
    if MODEL_CONFIG_DIR.is_dir() and "clip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_model_name(name: str) -> None:
    register_model_configs()
    known = open_clip.list_models()
    if name not in known and not name.startswith(("local-dir:", "hf-hub:")):
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"close matches: {', '.join(close)}" if close else f"{len(known)} known, e.g. ViT-B-16, ViT-L-14, ViT-H-14"
        raise ModelNameError(f"model.name={name!r} is not an open_clip model config; {hint}")


def loss_init(loss_name: str) -> dict:
    """Model constructor arguments a loss needs: SigLIP starts at t' = log 10 with a learnable bias b = -10."""
    return {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss_name == "siglip" else {}


def create_clip(name: str, activation_checkpointing: bool = False, loss_name: str = "clip"):
    """Returns (model, train_transform, eval_transform, tokenizer); weights are random (nothing downloads)."""
    check_model_name(name)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True,
                                                                     **loss_init(loss_name))
    if activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(name)


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


def clip_flops_per_sample(model: torch.nn.Module, image_size: int, context_length: int) -> float:
    """Forward+backward FLOPs of one image-text pair: 6 x parameters-in-matmuls x tokens, per tower
    (attention score FLOPs added), the usual MFU estimate."""
    def tower(module: torch.nn.Module, tokens: int, width: int, layers: int) -> float:
        matmul_params = sum(p.numel() for n, p in module.named_parameters() if p.ndim == 2 and "embedding" not in n)
        return 6 * matmul_params * tokens + 6 * 2 * layers * tokens * tokens * width

    v, t = model.visual, model.transformer
    patch = v.patch_size[0] if isinstance(v.patch_size, tuple) else v.patch_size
    v_tokens = (image_size // patch) ** 2 + 1
    return (tower(v, v_tokens, v.transformer.width, v.transformer.layers)
            + tower(t, context_length, t.width, t.layers))
