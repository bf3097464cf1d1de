"""ImageBind-style binding: each non-image modality (audio, depth, thermal, IMU) is trained against the frozen
image embeddings of its pairs with the CLIP loss; text never meets the modality in training, yet text ->
modality zero-shot works because both live in the image tower's space.

A batch's path: loader (ModalityDecoder: the image transform + each modality's decoder and transform) ->
ImageBindModel (frozen open_clip towers + one encoder per modality, pipeline/models/imagebind.py) -> one CLIP
loss per modality over all ranks, averaged.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.image_decode import ImageToTensor
from pipeline.data.loader import expand_shards, image_member, local_shards, stack_collate
from pipeline.data.modalities import decode_modality, make_modality_transform
from pipeline.models.clip import promote_scalar_params
from pipeline.models.imagebind import MODALITIES, build_imagebind, encoder_config
from pipeline.objectives.clip_loss import clip_loss
from pipeline.train.engine import compute_dtype


def _towers_embed_dim(towers: str) -> int:
    path = Path(towers.removeprefix("local-dir:"))
    if (path / "open_clip_config.json").is_file():
        return json.loads((path / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    import open_clip

    from pipeline.models.clip import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(towers)
    if cfg is None:
        raise ConfigError(f"imagebind.towers={towers!r} is neither an open_clip directory (open_clip_config.json) "
                          f"nor an open_clip model name")
    return cfg["embed_dim"]


def check(cfg: RunConfig) -> None:
    ib = cfg.imagebind
    if not ib.towers:
        raise ConfigError("imagebind.towers is empty; give the open_clip directory of the image and text towers "
                          "(e.g. runs/demo/export from the CLIP demo)")
    _towers_embed_dim(ib.towers)
    unknown = [m for m in ib.modalities if m not in MODALITIES]
    if unknown or not ib.modalities:
        raise ConfigError(f"imagebind.modalities={ib.modalities} must be a non-empty list of {', '.join(MODALITIES)}")
    if cfg.data.val:
        expand_shards(cfg.data.val, "data.val")
    if cfg.data.classes:
        from pipeline.eval.class_prompts import load_class_prompts

        load_class_prompts(cfg.data.classes)  # raises ConfigError naming data.classes


def _decode_options(cfg: RunConfig, modality: str) -> dict:
    return {"audio": {"sample_rate": cfg.imagebind.sample_rate},
            "depth": {"depth_scale": cfg.imagebind.depth_scale}}.get(modality, {})


class ModalityDecoder:
    """image + every configured modality -> {"images", "<modality>": input tensor, "converted": conversions}.
    A sample lacking one of the modalities is skipped (BadSample "missing_<member>") and counted."""

    def __init__(self, image_transform, modality_transforms: dict, decode_options: dict, reduced_decode: bool):
        self.image, self.modality_transforms = ImageToTensor(image_transform, reduced_decode), modality_transforms
        self.decode_options = decode_options

    def sample(self, raw: dict[str, bytes]) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.image(image_member(raw))}
        converted = Counter()
        for m, transform in self.modality_transforms.items():
            decoded = decode_modality(raw, m, **self.decode_options[m])
            converted.update(decoded.conversions)
            out[m] = transform(decoded.value)
        out["converted"] = converted
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = stack_collate(samples)
        batch["converted"] = sum(batch["converted"], Counter())
        return batch


class ImageBindTask:
    def __init__(self, cfg: RunConfig):
        ib = self.ib = cfg.imagebind
        self.cfg = cfg
        dim = _towers_embed_dim(ib.towers)
        self.encoder_configs = {m: encoder_config(m, dim, ib.preset) for m in ib.modalities}
        model, train_tf, self.eval_transform, self.tokenizer = build_imagebind(ib.towers, self.encoder_configs,
                                                                                ib.freeze_towers)
        promote_scalar_params(model)
        self.model = model
        self.decode_options = {m: _decode_options(cfg, m) for m in ib.modalities}
        transforms = {m: make_modality_transform(m, c, train=True, **self._transform_options(m))
                      for m, c in self.encoder_configs.items()}
        self.decoder = ModalityDecoder(train_tf, transforms, self.decode_options, cfg.data.jpeg_draft)
        self.flops_per_sample = self._flops()

    def _transform_options(self, modality: str) -> dict:
        if modality == "audio":
            return {"sample_rate": self.ib.sample_rate, "clip_seconds": self.ib.clip_seconds}
        return {}

    def _flops(self) -> float:
        """6 x encoder matmul parameters x tokens (forward + backward of the encoders) + 2 x the frozen image
        tower's (forward only)."""
        total = 0.0
        for m, enc in self.model.encoders.items():
            matmul = sum(p.numel() for p in enc.parameters() if p.ndim == 2)
            total += 6 * matmul * (enc.config.num_patches + 1)
        visual = self.model.clip.visual
        tokens = getattr(visual, "grid_size", (1, 1))
        total += 2 * sum(p.numel() for p in visual.parameters() if p.ndim == 2) * (tokens[0] * tokens[1] + 1)
        return total

    def param_groups(self) -> list[dict]:
        return self.model.parameter_groups(self.cfg.train.lr, self.cfg.train.weight_decay, self.ib.tower_lr_scale)

    def loss(self, engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        dtype = compute_dtype(engine)
        images = self.decoder.image.model_input(batch["images"], device, dtype)
        losses, stats = [], {}
        for m in self.ib.modalities:
            out = engine(images, m, batch[m].to(device, dtype, non_blocking=True))
            loss = clip_loss(out["image_features"], out["modality_features"], out["logit_scale"],
                             self.cfg.loss.logit_scale_max)
            losses.append(loss)
            stats[f"loss/{m}"] = loss.detach()
            stats[f"logit_scale/{m}"] = out["logit_scale"].detach().float().reshape(())
        return torch.stack(losses).mean(), stats

    def evaluate(self, model: torch.nn.Module) -> dict:
        from pipeline.eval.emergent import evaluate_emergent, format_emergent

        cfg = self.cfg
        if not cfg.data.val:
            return {}
        results, val = {}, local_shards(cfg.data.val, "data.val", cfg.data)
        for m, enc_cfg in self.encoder_configs.items():
            transform = make_modality_transform(m, enc_cfg, train=False, **self._transform_options(m))
            r = evaluate_emergent(model, m, val, self.eval_transform, transform, self.tokenizer,
                                  cfg.data.classes, cfg.eval.batch_size, cfg.eval.recall_at,
                                  decode_options=self.decode_options[m])
            print(f"eval {m}: " + format_emergent(r), flush=True)
            results.update({k: v for k, v in r.items() if k not in ("modality",)})
        return results
