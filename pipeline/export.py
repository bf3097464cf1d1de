"""DeepSpeed checkpoint (any ZeRO stage) -> consolidated weights, and the export formats: an open_clip directory
(open_clip_config.json + open_clip_model.safetensors) for CLIP, a timm directory for backbones. Which task writes
which: each task class's `export` (pipeline/tasks/registry.py, `export_checkpoint`).

`open_clip.create_model_and_transforms("local-dir:<dir>")` loads the result with no code of ours (a SwinV2 tower at
another image size than its timm architecture's also needs `force_image_size`, recorded in the config's
"pipeline" entry). A SwinV2 image trunk is also written as a timm directory, `<dir>/timm_image_trunk/`.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from pipeline.export_target import ExportTargetError, export_directory
from pipeline.train.checkpoint import CheckpointError, load_state_file, resolve_checkpoint, vet_checkpoint


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (partitions merged). Parameters the
    optimizer did not hold (frozen towers) come from the module state that rank 0 saved."""
    vet_checkpoint(ckpt)  # every file DeepSpeed's zero_to_fp32 below may unpickle (weights_only=False)
    model_states = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))  # ZeRO-3 prefixes it with zero_pp_rank_0_
    if not model_states:
        raise CheckpointError(f"{ckpt} holds no DeepSpeed model states (mp_rank_00_model_states.pt)")
    states = load_state_file(model_states[0])
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{model_states[0]} holds no module state dict")
    module = {k: v.float() for k, v in states["module"].items() if v.numel()}  # ZeRO-3 leaves empty placeholders
    if any(ckpt.glob("*optim_states.pt")) and any(ckpt.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # loads with weights_only=False: the files passed vet_checkpoint above
        trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        module = {**{k: v for k, v in module.items() if k not in trained}, **trained}
    bad = [k for k, v in module.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{ckpt} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
                              f"diverged before this checkpoint; use an earlier one")
    return module


def checkpoint_weights(ckpt: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """consolidated_state_dict, with the trained parameters replaced by their EMA (train.ema_decay) if `ema`."""
    from pipeline.train.ema import read_ema

    state = consolidated_state_dict(ckpt)
    if ema:
        average = read_ema(ckpt)
        if average is None:
            raise FileNotFoundError(f"{ckpt} holds no weight EMA (the run had no train.ema_decay)")
        state.update({k: v.reshape(state[k].shape) if k in state else v for k, v in average.items()})
    return state


def checkpoint_config(ckpt: Path) -> dict:
    """The resolved run config saved in the checkpoint (a mapping with at least model.name), else CheckpointError."""
    try:
        cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: not readable as the run's config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "name" not in cfg["model"]:
        raise CheckpointError(f"{ckpt / 'config.yaml'} is not a run config (no model.name)")
    return cfg


@contextmanager
def weights_fit(ckpt: Path, cfg: dict):
    """Turns a state dict that does not fit the model its config names (another task's checkpoint, an edited
    config) into one CheckpointError line instead of torch's key-by-key report."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, (CheckpointError, ExportTargetError)):
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{ckpt}: its weights do not fit the model its config names (task "
                              f"{cfg.get('task', 'clip')}, model.name {cfg['model']['name']}): {detail}") from None


def load_model_from_checkpoint(ckpt: Path, ema: bool = False):
    """(model, train_transform, eval_transform, tokenizer, config dict): the open_clip model of a CLIP run's
    checkpoint with its weights (its weight EMA if `ema`), as the open_clip export writes it. Any task's
    checkpoint as its task builds it: `TaskBase.from_checkpoint` (pipeline/tasks/base.py)."""
    from pipeline.models.clip import create_clip, load_state_dict_reshaped

    cfg = checkpoint_config(ckpt)
    if cfg.get("task", "clip") != "clip":
        raise CheckpointError(f"{ckpt} is a checkpoint of a {cfg['task']} run, not of a CLIP / SigLIP model")
    model, train_tf, eval_tf, tokenizer = create_clip(cfg["model"]["name"], loss_name=cfg["loss"]["name"])
    state = checkpoint_weights(ckpt, ema)
    clamp_logit_scale(state, cfg["loss"]["logit_scale_max"])
    with weights_fit(ckpt, cfg):
        load_state_dict_reshaped(model, state)
    return model, train_tf, eval_tf, tokenizer, cfg


def clamp_logit_scale(state: dict, logit_scale_max: float) -> None:
    """Training clamps exp(t') in the loss; open_clip's forward does not, so the exported t' is clamped."""
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].clamp(max=math.log(logit_scale_max))


def open_clip_export_kwargs(export_dir: str | Path) -> dict:
    """What `open_clip.create_model_and_transforms(f"local-dir:{export_dir}", **kwargs)` needs besides the
    directory: {} for most models, {"force_image_size": N} for a SwinV2 tower run at another size than its timm
    architecture's (open_clip does not pass image_size to timm)."""
    cfg = json.loads((Path(export_dir) / "open_clip_config.json").read_text())
    return dict(cfg.get("pipeline", {}).get("open_clip_kwargs", {}))


def export_open_clip(checkpoint: str | Path, out_dir: str | Path, ema: bool = False) -> Path:
    from safetensors.torch import save_file
    import open_clip

    from pipeline.export_timm import export_clip_image_trunk
    from pipeline.models.clip import loss_init, open_clip_load_kwargs

    ckpt = resolve_checkpoint(checkpoint)
    model, _, _, _, cfg = load_model_from_checkpoint(ckpt, ema)
    name = cfg["model"]["name"]
    model_cfg = {**open_clip.get_model_config(name), **loss_init(cfg["loss"]["name"])}  # SigLIP: keeps logit_bias
    pp = model.visual.preprocess_cfg
    preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    out = Path(out_dir)
    with export_directory(out, "open_clip") as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg,
            "pipeline": {"source_checkpoint": str(ckpt), "model_name": name, "step": int(ckpt.name.split("_")[1]),
                         "weights": "ema" if ema else "raw",
                         **({"open_clip_kwargs": kw} if (kw := open_clip_load_kwargs(model)) else {})},
        }, indent=2))
        export_clip_image_trunk(model, tmp / "timm_image_trunk")  # SwinV2 trunks only; None (nothing) otherwise
    return out


def export_backbone_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = False,
                               encoder_only: bool = False) -> Path:
    """A supervised / SimMIM run's checkpoint -> timm directory (config.json + model.safetensors) of the backbone;
    `encoder_only` (SimMIM): the weights under `encoder.`, without mask token and pixel decoder, no classifier."""
    from pipeline.export_timm import export_timm
    from pipeline.models.backbone import resolve_backbone

    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    state = checkpoint_weights(ckpt, ema)
    kwargs = dict(cfg["model"].get("kwargs") or {})
    if encoder_only:
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        kwargs["num_classes"] = 0
    arch, arch_kwargs = resolve_backbone(cfg["model"]["name"], **kwargs)
    with weights_fit(ckpt, cfg):
        return export_timm(state, out_dir, arch, arch_kwargs)
