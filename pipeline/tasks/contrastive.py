"""Image-text contrastive pretraining (CLIP / SigLIP) on an open_clip model.

A batch's path: loader (ImageTextDecoder: image transform + tokenisation) -> open_clip model -> CLIP loss over
all ranks' pairs (pipeline/objectives/clip_loss.py) or the sigmoid loss on a ring (siglip_loss.py). With
gradient accumulation the loss spans every micro-batch of the step (pipeline/train/full_batch_accumulation.py).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import open_clip
import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.decoders import ImageTextDecoder
from pipeline.data.loader import expand_shards, local_shards
from pipeline.eval.class_prompts import load_class_prompts
from pipeline.models.clip import check_model_name, clip_step_flops, create_clip, promote_scalar_params
from pipeline.models.pretrained import check_clip_pretrained, load_clip_pretrained
from pipeline.objectives.clip_loss import clip_loss
from pipeline.objectives.siglip_loss import siglip_loss
from pipeline.tasks.base import TaskBase
from pipeline.train.full_batch_accumulation import full_batch_losses


def contrastive_loss(out: dict, cfg: RunConfig) -> torch.Tensor:
    if cfg.loss.name == "siglip":
        return siglip_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                           cfg.loss.logit_scale_max)
    return clip_loss(out["image_features"], out["text_features"], out["logit_scale"], cfg.loss.logit_scale_max)


def lock_towers(model: torch.nn.Module, cfg: RunConfig) -> None:
    """LiT: model.lock_image / model.lock_text through open_clip's own lock_image_tower / lock_text_tower, so the
    semantics are open_clip_train's: a locked part has requires_grad=False (the optimizer never sees it), the
    last `lock_image_unlocked_groups` layer groups of the image tower (ViT: stem, blocks, last block + ln_post,
    proj) and the last `lock_text_unlocked_layers` groups of the text tower (text_projection, last block +
    ln_final, blocks, embeddings) still train; BatchNorm statistics of a locked
    ResNet / timm tower freeze only with lock_image_freeze_bn_stats (open_clip_train's
    --lock-image-freeze-bn-stats). The logit scale (and SigLIP's bias) always trains."""
    m = cfg.model
    if m.lock_image:
        model.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups,
                               freeze_bn_stats=m.lock_image_freeze_bn_stats)
    if m.lock_text:
        model.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)


class ContrastiveTask(TaskBase):
    evaluates_on_all_ranks = True  # evaluate() spreads the held-out set over the ranks (pipeline/eval/ranks.py)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Every model option applies here (LiT locking and patch dropout are this task's)."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        m = cfg.model
        check_model_name(m.name)
        vision_cfg = (open_clip.get_model_config(m.name) or {}).get("vision_cfg", {})
        if m.patch_dropout and vision_cfg.get("timm_model_name"):
            raise ConfigError(f"model.patch_dropout works on open_clip's own ViT image towers; {m.name}'s is timm's "
                              f"{vision_cfg['timm_model_name']}")
        if m.pretrained:
            check_clip_pretrained(m.name, m.pretrained, cfg.loss.name, m.patch_dropout)
        if cfg.data.val:
            expand_shards(cfg.data.val, "data.val")
        if cfg.data.classes:
            load_class_prompts(cfg.data.classes)  # raises ConfigError naming data.classes

    @classmethod
    def plan_model(cls, cfg: RunConfig) -> torch.nn.Module:
        """The trainer's model on the meta device: its patch dropout and locked towers change its FLOPs."""
        from pipeline.plan import meta_model

        model = meta_model(cfg.model.name, cfg.loss.name, cfg.model.patch_dropout)
        lock_towers(model, cfg)
        return model

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False):
        """open_clip directory (and a timm directory of a SwinV2 image trunk): pipeline/export.py."""
        from pipeline.export import export_open_clip

        return export_open_clip(checkpoint, out_dir, ema)

    @classmethod
    def export_written(cls, out) -> str:
        from pipeline.export import open_clip_export_kwargs

        return (f"open_clip directory written: {out} (load with open_clip.create_model_and_transforms("
                f"'local-dir:{out}'{''.join(f', {k}={v!r}' for k, v in open_clip_export_kwargs(out).items())}))")

    @classmethod
    def run_demo(cls, out, config, steps, nproc, train_samples) -> dict:
        from pipeline.demo import run_clip_demo

        return run_clip_demo(out, config, steps=steps, nproc=nproc, train_samples=train_samples)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        m = cfg.model
        model, train_tf, self.eval_transform, self.tokenizer = create_clip(
            m.name, m.activation_checkpointing, cfg.loss.name, m.patch_dropout, cfg.loss.siglip_init_scale,
            cfg.loss.siglip_init_bias)
        if m.pretrained:
            load_clip_pretrained(model, m.name, m.pretrained)
        lock_towers(model, cfg)
        promote_scalar_params(model)
        self.model = model
        self.decoder = ImageTextDecoder(train_tf, self.tokenizer, cfg.data.jpeg_draft, cfg.data.max_caption_bytes)
        self.flops_per_sample = clip_step_flops(model)  # after lock_towers: a locked tower counts its forward only

    def param_groups(self) -> list[dict] | None:
        """The default decay / no-decay split (engine.param_groups), with layer decay per tower when
        train.layer_decay < 1, and SigLIP's bias b at its own lr when loss.siglip_bias_lr_scale != 1."""
        t, bias_scale = self.cfg.train, self.cfg.loss.siglip_bias_lr_scale
        own_bias_lr = self.cfg.loss.name == "siglip" and bias_scale != 1.0 and self.model.logit_bias.requires_grad
        if t.layer_decay == 1 and not own_bias_lr:
            return None
        from pipeline.train.engine import no_weight_decay, param_groups
        from pipeline.train.layer_decay import layer_decay_param_groups

        if t.layer_decay == 1:
            groups = param_groups(self.model, t.weight_decay)
        else:
            groups = layer_decay_param_groups(self.model, t.lr, t.weight_decay, t.layer_decay,
                                              no_weight_decay_fn=no_weight_decay)
        if not own_bias_lr:
            return groups
        bias = self.model.logit_bias
        home = next(g for g in groups if any(p is bias for p in g["params"]))
        groups = [{**g, "params": [p for p in g["params"] if p is not bias]} for g in groups]
        return groups + [{**home, "params": [bias], "weight_decay": 0.0,
                          "lr": home.get("lr", t.lr) * bias_scale}]

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        return self._loss_of(engine(batch["images"], batch["texts"]))

    def step_losses(self, engine, batches: Iterable[dict],
                    device: torch.device) -> Iterator[tuple[torch.Tensor, dict]]:
        """With train.grad_accum > 1 the loss of each micro-batch spans the whole step's batch: negatives from
        every micro-batch of every rank (pipeline/train/full_batch_accumulation.py)."""
        if self.cfg.train.grad_accum == 1:
            return (self.loss(engine, batch) for batch in batches)
        return full_batch_losses(lambda batch: engine(batch["images"], batch["texts"]), self._loss_of, batches,
                                 ("image_features", "text_features"), device)

    def _loss_of(self, out: dict) -> tuple[torch.Tensor, dict]:
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
