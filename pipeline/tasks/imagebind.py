"""ImageBind-style binding: each non-image modality (audio, depth, thermal, IMU) is trained against the frozen
image embeddings of its pairs with the CLIP loss; text never meets the modality in training, yet text ->
modality zero-shot works because both live in the image tower's space.

A batch's path: loader (ModalityDecoder: the image transform + the decoder and transform of each modality the
sample carries) -> ImageBindModel (frozen open_clip towers + one encoder per modality,
pipeline/models/imagebind.py) -> one CLIP loss per modality over the pairs of all ranks that carry it, averaged
over the modalities present (pipeline/objectives/binding_loss.py).

One paired dataset per modality, as ImageBind trains (audio-image, depth-image, thermal-image, IMU-image): give
them as `data.train` sources ('::'-joined, weighted by `data.train_weights`); a sample's modalities are the
members it carries, so one source may also carry several. The loader's epoch plan shuffles the sources' shards
and then samples within `data.shuffle_block`, so with a block spanning many shards of every source a global
batch mixes the sources in proportion to their weighted sizes; with a block inside one shard it draws from one
source. Mixed is the choice: every encoder gets a gradient every step (one source per step leaves three of four
encoders without one on most steps while AdamW's momentum and weight decay still move them), at the cost of
fewer negatives per modality per step (about G x its share instead of G; `samples/<m>` in the metrics). On the
disjoint demo, at the same samples and time, mixed batches gave text -> thermal / IMU / audio zero-shot of
34% / 45% / 41% against 9% / 9% / 38% with one source per batch, which ran ~10% more samples/s
(bench/results/demo_runs.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.data.decoders import ModalityDecoder, carries
from pipeline.data.loader import FetchSpec, ShardSet, expand_shards, expand_sources
from pipeline.data.modality_transforms import make_modality_transform
from pipeline.models.clip import promote_scalar_params
from pipeline.models.imagebind import MODALITIES, build_imagebind, encoder_config
from pipeline.objectives.binding_loss import binding_loss_share, rank_counts
from pipeline.tasks.base import TaskBase
from pipeline.train.flops import forward_flops, step_flops, trains


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


def _decode_options(cfg: RunConfig, modality: str) -> dict:
    return {"audio": {"sample_rate": cfg.imagebind.sample_rate},
            "depth": {"depth_scale": cfg.imagebind.depth_scale}}.get(modality, {})


def modality_input_shape(config) -> tuple[int, ...]:
    """One sample's encoder input shape (without the batch dimension), from its EncoderConfig."""
    if config.modality == "imu":
        return tuple(config.input_size)
    return (config.in_channels, *config.input_size)


class ImageBindTask(TaskBase):
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.pretrained:
            raise ConfigError("model.pretrained does not apply to task=imagebind: its towers come from "
                              "imagebind.towers")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
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

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False) -> Path:
        """`export_imagebind` layout: towers/ (open_clip directory) and one `<modality>/` encoder directory each
        (`pipeline.models.imagebind.load_encoder`)."""
        from pipeline.models.imagebind import export_imagebind

        return export_imagebind(cls.from_checkpoint(checkpoint, ema).model, out_dir)

    @classmethod
    def export_written(cls, out) -> str:
        return (f"ImageBind export written: {out} (load with pipeline.models.imagebind.load_imagebind('{out}'), "
                f"or one encoder with load_encoder('{out}/<modality>'))")

    @classmethod
    def run_demo(cls, out, config, steps, nproc, train_samples) -> dict:
        from pipeline.demo import run_imagebind_demo

        return run_imagebind_demo(out, config, steps=steps, nproc=nproc, train_samples=train_samples)

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
        self.image_flops, self.encoder_flops = self._flops()
        # a sample carrying every configured modality (one source with them all); batch_flops counts each batch
        self.flops_per_sample = self.image_flops + sum(self.encoder_flops.values())

    def _transform_options(self, modality: str) -> dict:
        if modality == "audio":
            return {"sample_rate": self.ib.sample_rate, "clip_seconds": self.ib.clip_seconds}
        return {}

    def _flops(self) -> tuple[int, dict[str, int]]:
        """Per sample (pipeline/train/flops.py): the image tower's step (its forward x1 when frozen,
        imagebind.freeze_towers, else x3), and each configured encoder's (x3)."""
        model = self.model
        size = model.clip.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        image = forward_flops(model, torch.empty(1, 3, *size, device="meta"), call=lambda mod, x: mod.encode_image(x))
        encoders = {}
        for m, enc in model.encoders.items():
            inputs = torch.empty(1, *modality_input_shape(self.encoder_configs[m]), device="meta")
            forward = forward_flops(model, inputs, call=lambda mod, x, m=m: mod.encode_modality(m, x))
            encoders[m] = step_flops(forward, trains(enc.parameters()))
        return step_flops(image, trains(model.clip.visual.parameters())), encoders

    def batch_flops(self, samples: int, stats: dict) -> float:
        """The image tower on every sample, each encoder on the samples that carry its modality (`samples/<m>`
        of the loss's stats, over all ranks): with one source per modality (imagebind_disjoint.yaml) a sample
        runs one encoder, and counting all of them would overstate the MFU."""
        return samples * self.image_flops + sum(f * stats[f"samples/{m}"] for m, f in self.encoder_flops.items())

    def param_groups(self) -> list[dict]:
        return self.model.parameter_groups(self.cfg.train.lr, self.cfg.train.weight_decay, self.ib.tower_lr_scale)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean over the modalities present in the global batch of each one's loss over all ranks' pairs.
        Every encoder runs on every rank, on an empty batch where this rank has no sample of its modality, so
        every rank's gradients cover the same parameters (DeepSpeed reduces them in the same buckets)."""
        images = batch["images"]
        mods = self.ib.modalities
        local = [int(batch[f"{m}_rows"].numel()) if f"{m}_rows" in batch else 0 for m in mods]
        table = rank_counts(local)  # the same on every rank: which modality runs which collective
        losses, unused, stats = [], [], {}
        for j, m in enumerate(mods):
            sizes = [row[j] for row in table]
            if f"{m}_rows" in batch:
                rows = batch[f"{m}_rows"]
                img = images if rows.numel() == images.shape[0] else images[rows]
                inputs = batch[m]
            else:
                img = images[:0]
                inputs = images.new_zeros((0, *modality_input_shape(self.encoder_configs[m])))
            out = engine(img, m, inputs)
            stats[f"samples/{m}"] = sum(sizes)
            stats[f"logit_scale/{m}"] = out["logit_scale"].detach().float().reshape(())
            if sum(sizes) == 0:  # no rank has it: no collective; a zero gradient keeps the buckets the same
                unused.append(out["modality_features"].sum() * 0.0)
                continue
            loss = binding_loss_share(out["image_features"], out["modality_features"], out["logit_scale"], sizes,
                                      self.cfg.loss.logit_scale_max)
            losses.append(loss)
            stats[f"loss/{m}"] = loss
        total = torch.stack(losses).mean() + sum(unused) if losses else torch.stack(unused).sum()
        if losses:  # the global per-modality losses (each rank holds its share); reported, not differentiated
            present = [m for m in mods if f"loss/{m}" in stats]
            shares = torch.stack([stats[f"loss/{m}"].detach() for m in present])
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(shares)
                shares = shares / torch.distributed.get_world_size()
            stats.update({f"loss/{m}": v for m, v in zip(present, shares)})
        return total, stats

    def val_sources(self) -> dict[str, list[str]]:
        """{modality: the shards of the `data.val` sources that carry it}: a source carries what its first
        sample carries ('::'-joined sources, one held-out set per paired dataset; one source may carry all)."""
        cfg = self.cfg
        out: dict[str, list[str]] = {m: [] for m in self.ib.modalities}
        for source in expand_sources(cfg.data.val, "data.val", FetchSpec.for_data(cfg.data)):
            shards = ShardSet(source)
            if shards.total == 0:
                continue
            _, raw = shards.read(0)
            for m in out:
                if carries(raw, m):
                    out[m] += source
        return out

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Emergent zero-shot and retrieval of each modality on its own held-out sources. Keys per modality:
        "<m>_zero_shot_top1/top5", "<m>_zero_shot_chance" (1 / classes), "<m>_samples", "<m>_bad",
        "<m>_image_zero_shot_top1/top5" (the frozen image tower on the same samples), "<m>2image_R@k", ...;
        "classes" once."""
        from pipeline.eval.emergent import evaluate_emergent, format_emergent

        cfg = self.cfg
        if not cfg.data.val:
            return {}
        results = {}
        for m, val in self.val_sources().items():
            if not val:
                print(f"eval {m}: no data.val source carries {m}; skipped", flush=True)
                continue
            transform = make_modality_transform(m, self.encoder_configs[m], train=False, **self._transform_options(m))
            r = evaluate_emergent(model, m, val, self.eval_transform, transform, self.tokenizer,
                                  cfg.data.classes, cfg.eval.batch_size, cfg.eval.recall_at,
                                  decode_options=self.decode_options[m])
            print(f"eval {m}: " + format_emergent(r), flush=True)
            for k, v in r.items():
                if k == "modality":
                    continue
                if k == "classes":
                    results["classes"] = v
                    results[f"{m}_zero_shot_chance"] = 1.0 / v
                elif k.startswith(m) or f"2{m}" in k:
                    results[k] = v
                else:  # samples, bad, image_zero_shot_*: per modality, since each has its own held-out set
                    results[f"{m}_{k}"] = v
        return results
