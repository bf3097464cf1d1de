"""Backbone pretraining on labelled or unlabelled images: `supervised` (classification from `.cls` labels, label
smoothing, mixup / cutmix) and `simmim` (masked image modelling: L1 on the pixels of masked patches), for timm
ViTs and our SwinV2 (pipeline/models/backbone.py). Evaluation: the classifier's top-1/5, kNN and a linear probe
on frozen pooled features, and for SimMIM the held-out reconstruction error.

A batch's path: loader (ImageLabelDecoder / MaskedImageDecoder: transform, label or mask drawn under the
loader's per-sample seed) -> backbone (+ mask token and pixel decoder for SimMIM) -> loss.
"""
from __future__ import annotations

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.decoders import ImageLabelDecoder, MaskedImageDecoder
from pipeline.data.loader import expand_shards, local_shards
from pipeline.models.backbone import (BackboneNameError, backbone_info, backbone_transforms, create_backbone,
                                      load_backbone_weights, resolve_backbone)
from pipeline.models.pretrained import check_source, read_state_dict
from pipeline.objectives.classification import MixConfig, batch_rng, classification_loss, mix_batch
from pipeline.objectives.simmim import SimMIM, evaluate_reconstruction
from pipeline.tasks.base import TaskBase
from pipeline.train.layer_decay import layer_decay_param_groups
from pipeline.train.flops import forward_flops, step_flops, trains


def _init_weights(model: torch.nn.Module, source: str) -> None:
    """model.pretrained: a timm checkpoint / directory, or a (SimMIM, supervised) run of ours."""
    try:
        load_backbone_weights(model, read_state_dict(source))
    except ValueError as e:  # a ConfigError passes as is; load_backbone_weights' one-line ValueError gets the key
        raise e if isinstance(e, ConfigError) else ConfigError(f"model.pretrained={source}: {e}") from None


class _BackboneTask(TaskBase):
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        try:
            resolve_backbone(cfg.model.name, **cfg.model.kwargs)
        except BackboneNameError as e:
            raise ConfigError(str(e)) from None
        if cfg.model.pretrained:
            check_source(cfg.model.pretrained)
        if cfg.data.val:
            expand_shards(cfg.data.val, "data.val")
        if (cfg.loss.mixup or cfg.loss.cutmix) and cfg.train.batch_size % 2:
            raise ConfigError(f"loss.mixup / loss.cutmix pair image i with B-1-i: train.batch_size="
                              f"{cfg.train.batch_size} must be even")

    def __init__(self, cfg: RunConfig, kwargs: dict):
        self.cfg = cfg
        m, a = cfg.model, cfg.aug
        self.backbone = create_backbone(m.name, **kwargs)
        if m.pretrained:
            _init_weights(self.backbone, m.pretrained)
        if m.activation_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self.train_transform = backbone_transforms(
            self.backbone, True, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio), hflip=a.hflip,
            color_jitter=a.color_jitter, auto_augment=a.auto_augment or None, re_prob=a.re_prob)
        self.eval_transform = backbone_transforms(self.backbone, False,
                                                  **({"crop_pct": a.eval_crop_pct} if a.eval_crop_pct else {}))

    def _step_flops(self, *inputs: torch.Tensor) -> int:
        """FLOPs per image of a training step of self.model (pipeline/train/flops.py), called on one image and
        `inputs` (meta tensors, e.g. SimMIM's mask)."""
        info = backbone_info(self.backbone)
        images = torch.empty(1, info.in_chans, *info.img_size, device="meta")
        return step_flops(forward_flops(self.model, images, *inputs), trains(self.model.parameters()))

    @classmethod
    def export_written(cls, out) -> str:
        return f"timm directory written: {out} (load with timm.create_model('local-dir:{out}', pretrained=True))"

    def param_groups(self) -> list[dict]:
        t = self.cfg.train
        return layer_decay_param_groups(self.model, t.lr, t.weight_decay, t.layer_decay)

    def _evaluate_backbone(self, backbone: torch.nn.Module) -> dict:
        from pipeline.eval.knn import evaluate_backbone, format_backbone_results

        cfg, e = self.cfg, self.cfg.eval
        val = local_shards(cfg.data.val, "data.val", cfg.data)
        train = local_shards(cfg.data.train, "data.train", cfg.data)  # the kNN bank

        def probe(model):
            return evaluate_backbone(model, val, self.eval_transform, train, e.batch_size,
                                     e.knn_k, e.knn_temperature, e.knn_train_samples, e.linear_probe_epochs,
                                     e.linear_probe_lr, e.linear_probe_wd, seed=cfg.train.seed)

        results = probe(backbone)
        print("eval: " + format_backbone_results(results), flush=True)
        if e.random_init_baseline:  # what pretraining added: the same probes on the initial weights
            torch.manual_seed(cfg.train.seed)
            initial = create_backbone(cfg.model.name, **{**cfg.model.kwargs, "num_classes": backbone.num_classes})
            baseline = probe(initial.to(next(backbone.parameters()).device))
            print("eval at initial weights: " + format_backbone_results(baseline), flush=True)
            results.update({f"random_init_{k}": v for k, v in baseline.items() if "top" in k})
        return results


class SupervisedTask(_BackboneTask):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, cfg.model.kwargs)
        self.model = self.backbone
        self.decoder = ImageLabelDecoder(self.train_transform, cfg.data.jpeg_draft,
                                          getattr(self.model, "num_classes", 0) or None)
        l = cfg.loss
        self.mix = MixConfig(l.mixup, l.cutmix, l.mix_prob, l.mix_switch_prob, l.label_smoothing)
        self.flops_per_sample = self._step_flops()

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        images, labels = batch["images"], batch["labels"]
        targets = labels
        if self.mix.enabled:  # the mix is a function of the batch's place in the stream: resumes redraw it
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            images, targets, _ = mix_batch(images, labels, self.model.num_classes, self.mix,
                                           batch_rng(self.cfg.train.seed, batch["epoch"], batch["offset"], rank))
        logits = engine(images)
        loss = classification_loss(logits, targets, self.cfg.loss.label_smoothing)
        # a device tensor, read at log steps only (no host synchronisation per step)
        stats = {} if self.mix.enabled else {"train_top1": (logits.detach().argmax(-1) == labels).float().mean()}
        return loss, stats

    def evaluate(self, model: torch.nn.Module) -> dict:
        return self._evaluate_backbone(model) if self.cfg.data.val else {}

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False):
        """timm directory (config.json + model.safetensors) of the backbone with its classifier."""
        from pipeline.export import export_backbone_checkpoint

        return export_backbone_checkpoint(checkpoint, out_dir, ema)


class SimMIMTask(_BackboneTask):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, {**cfg.model.kwargs, "num_classes": 0})
        s = cfg.simmim
        self.model = SimMIM(self.backbone, s.norm_target_window)
        info = self.model.info
        try:
            self.decoder = MaskedImageDecoder(self.train_transform, info.grid_size, s.mask_ratio,
                                              s.mask_patch_size, info.patch_size, cfg.data.jpeg_draft)
        except ValueError as e:
            raise ConfigError(f"simmim: {e}") from None
        # the encoder with the mask token applied and the pixel decoder, as a step runs them
        self.flops_per_sample = self._step_flops(torch.zeros(1, *info.grid_size, dtype=torch.bool, device="meta"))

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        out = engine(batch["images"], batch["masks"])
        return out["loss"], {}

    def evaluate(self, model: torch.nn.Module) -> dict:
        cfg = self.cfg
        if not cfg.data.val:
            return {}
        s = cfg.simmim
        val = local_shards(cfg.data.val, "data.val", cfg.data)
        results = evaluate_reconstruction(model, val, self.eval_transform, s.mask_ratio, s.mask_patch_size,
                                          cfg.eval.batch_size, seed=cfg.train.seed)
        print(f"eval: held-out masked L1 {results['recon_l1']:.4f} (predicting the mean: "
              f"{results['recon_l1_mean_baseline']:.4f})", flush=True)
        return {**results, **self._evaluate_backbone(model.encoder)}

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False):
        """timm directory of the encoder alone (no mask token, no pixel decoder; num_classes 0)."""
        from pipeline.export import export_backbone_checkpoint

        return export_backbone_checkpoint(checkpoint, out_dir, ema, encoder_only=True)
