"""Image-text contrastive pretraining (CLIP / SigLIP) on an open_clip model.

A batch's path: loader (ImageTextDecoder: image transform + tokenisation) -> open_clip model -> CLIP loss over
all ranks' pairs (pipeline/objectives/clip_loss.py) or the sigmoid loss on a ring (siglip_loss.py). With
gradient accumulation the loss spans every micro-batch of the step (pipeline/train/full_batch_accumulation.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.loader import ImageTextDecoder, expand_shards, local_shards
from pipeline.models.clip import check_model_name, clip_flops_per_sample, create_clip, promote_scalar_params
from pipeline.objectives.clip_loss import clip_loss
from pipeline.objectives.siglip_loss import siglip_loss
from pipeline.train.engine import compute_dtype
from pipeline.train.full_batch_accumulation import full_batch_losses


def check(cfg: RunConfig) -> None:
    check_model_name(cfg.model.name)
    if cfg.data.val:
        expand_shards(cfg.data.val, "data.val")
    if cfg.data.classes and not Path(cfg.data.classes).is_file():
        raise ConfigError(f"data.classes: file not found: {cfg.data.classes}")


def contrastive_loss(out: dict, cfg: RunConfig) -> torch.Tensor:
    if cfg.loss.name == "siglip":
        return siglip_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                           cfg.loss.logit_scale_max)
    return clip_loss(out["image_features"], out["text_features"], out["logit_scale"], cfg.loss.logit_scale_max)


class ContrastiveTask:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        model, train_tf, self.eval_transform, self.tokenizer = create_clip(
            cfg.model.name, cfg.model.activation_checkpointing, cfg.loss.name, cfg.loss.siglip_init_scale,
            cfg.loss.siglip_init_bias)
        promote_scalar_params(model)
        self.model = model
        image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        self.decoder = ImageTextDecoder(train_tf, self.tokenizer, cfg.data.jpeg_draft)
        self.flops_per_sample = clip_flops_per_sample(model, image_size, self.tokenizer.context_length)

    def param_groups(self) -> list[dict] | None:
        """The default groups, except that SigLIP's bias b may get its own lr (`loss.siglip_bias_lr_scale`)."""
        scale = self.cfg.loss.siglip_bias_lr_scale
        if self.cfg.loss.name != "siglip" or scale == 1.0:
            return None
        from pipeline.train.engine import param_groups

        bias = self.model.logit_bias
        groups = [{**g, "params": [p for p in g["params"] if p is not bias]}
                  for g in param_groups(self.model, self.cfg.train.weight_decay)]
        return groups + [{"params": [bias], "weight_decay": 0.0, "lr": self.cfg.train.lr * scale}]

    def loss(self, engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        return self._loss_of(self._encode(engine, batch, device))

    def step_losses(self, engine, batches: Iterable[dict],
                    device: torch.device) -> Iterator[tuple[torch.Tensor, dict]]:
        """With train.grad_accum > 1 the loss of each micro-batch spans the whole step's batch: negatives from
        every micro-batch of every rank (pipeline/train/full_batch_accumulation.py)."""
        if self.cfg.train.grad_accum == 1:
            return (self.loss(engine, batch, device) for batch in batches)
        return full_batch_losses(lambda batch: self._encode(engine, batch, device), self._loss_of, batches,
                                 ("image_features", "text_features"), device)

    def _encode(self, engine, batch: dict, device: torch.device) -> dict:
        dtype = compute_dtype(engine)
        return engine(self.decoder.image.model_input(batch["images"], device, dtype),
                      batch["texts"].to(device, non_blocking=True))

    def _loss_of(self, out: dict) -> tuple[torch.Tensor, dict]:
        loss = contrastive_loss(out, self.cfg)
        stats = {"logit_scale": out["logit_scale"].detach().float().clamp(max=self.cfg.loss.logit_scale_max)}
        if "logit_bias" in out:
            stats["logit_bias"] = out["logit_bias"].detach().float()
        return loss, stats

    def evaluate(self, model: torch.nn.Module) -> dict:
        from pipeline.eval.zero_shot import evaluate, format_results

        cfg = self.cfg
        if not cfg.data.val:
            return {}
        val = local_shards(cfg.data.val, "data.val", cfg.data)
        results = evaluate(model, self.eval_transform, self.tokenizer, val, cfg.data.classes, cfg.eval.batch_size,
                           cfg.eval.recall_at)
        print("eval: " + format_results(results), flush=True)
        return results
