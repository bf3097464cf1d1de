"""Image-text contrastive pretraining (CLIP / SigLIP) on an open_clip model.

A batch's path: loader (ImageTextDecoder: image transform + tokenisation) -> open_clip model -> CLIP loss over
all ranks' pairs (pipeline/objectives/clip_loss.py) or the sigmoid loss on a ring (siglip_loss.py).
"""
from __future__ import annotations

import torch

from pipeline.config import RunConfig
from pipeline.data.loader import ImageTextDecoder, expand_shards, local_shards
from pipeline.eval.class_prompts import load_class_prompts
from pipeline.models.clip import check_model_name, clip_flops_per_sample, create_clip, promote_scalar_params
from pipeline.objectives.clip_loss import clip_loss
from pipeline.objectives.siglip_loss import siglip_loss
from pipeline.train.engine import compute_dtype


def check(cfg: RunConfig) -> None:
    check_model_name(cfg.model.name)
    if cfg.data.val:
        expand_shards(cfg.data.val, "data.val")
    if cfg.data.classes:
        load_class_prompts(cfg.data.classes)  # raises ConfigError naming data.classes


def contrastive_loss(out: dict, cfg: RunConfig) -> torch.Tensor:
    if cfg.loss.name == "siglip":
        return siglip_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                           cfg.loss.logit_scale_max)
    return clip_loss(out["image_features"], out["text_features"], out["logit_scale"], cfg.loss.logit_scale_max)


class ContrastiveTask:
    evaluates_on_all_ranks = True  # evaluate() spreads the held-out set over the ranks (pipeline/eval/ranks.py)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        model, train_tf, self.eval_transform, self.tokenizer = create_clip(
            cfg.model.name, cfg.model.activation_checkpointing, cfg.loss.name)
        promote_scalar_params(model)
        self.model = model
        image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        self.decoder = ImageTextDecoder(train_tf, self.tokenizer, cfg.data.jpeg_draft)
        self.flops_per_sample = clip_flops_per_sample(model, image_size, self.tokenizer.context_length)

    def param_groups(self) -> None:
        return None

    def loss(self, engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
        dtype = compute_dtype(engine)
        out = engine(self.decoder.image.model_input(batch["images"], device, dtype),
                     batch["texts"].to(device, non_blocking=True))
        loss = contrastive_loss(out, self.cfg)
        stats = {"logit_scale": out["logit_scale"].detach().float().clamp(max=self.cfg.loss.logit_scale_max)}
        if "logit_bias" in out:
            stats["logit_bias"] = out["logit_bias"].detach().float()
        return loss, stats

    def evaluate(self, model: torch.nn.Module) -> dict:
        from pipeline.eval.ranks import EvalRanks
        from pipeline.eval.zero_shot import evaluate, format_results

        cfg = self.cfg
        if not cfg.data.val:
            return {}
        val = local_shards(cfg.data.val, "data.val", cfg.data)
        results = evaluate(model, self.eval_transform, self.tokenizer, val, cfg.data.classes, cfg.eval.batch_size,
                           cfg.eval.recall_at, workers=cfg.data.workers)
        if EvalRanks.current().rank == 0:
            print("eval: " + format_results(results), flush=True)
        return results
