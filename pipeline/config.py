"""Typed run configuration: YAML -> dataclasses, dotted `key=value` overrides, validation at load time.

Every error is a `ConfigError` whose message is one line naming the key and, where there is a closed set,
the valid choices. Nothing here starts a process group: the trainer validates first and launches after.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is meant to be shown to the user as is."""


@dataclass
class DataConfig:
    train: str = ""  # shard pattern(s) for training, braceexpand syntax; several joined with '::'
    val: str = ""  # held-out shards for zero-shot / retrieval evaluation
    classes: str = ""  # zero-shot: imagenet (open_clip's metadata), a JSON list of names or {"classes", "templates"}
    workers: int = 2  # loader processes per rank
    shuffle_block: int = 4096  # samples are shuffled within blocks of this many (after shard order shuffle)
    max_bad_fraction: float = 0.01  # stop the run when more than this fraction of samples fails to decode
    train_weights: str = ""  # per-source weights for a '::'-joined data.train, e.g. "1::0.5"; "" = all 1
    resampled: bool = False  # draw every epoch with replacement (weights as probabilities); --dataset-resampled
    jpeg_draft: bool = True  # decode JPEGs at 1/2..1/8 scale (libjpeg DCT scaling) when the crop keeps the input size
    cache_dir: str = ""  # node-local cache of `pipe:` shards; "" = $PIPELINE_SHARD_CACHE or ~/.cache/pipeline/shards
    pipe_timeout_s: float = 3600.0  # whole fetch of one `pipe:` shard (0 = no limit)
    pipe_stall_timeout_s: float = 120.0  # a `pipe:` command that sends no byte for this long is killed (0 = off)
    pipe_prefetch: int = 4  # `pipe:` shards fetched at once (and ahead of use by each loader worker)
    pipe_max_shard_gb: float = 64.0  # a `pipe:` command that writes more than this is killed (0 = no limit): a
    #                                  runaway source (`pipe:yes`) must not fill the cache disk
    cache_max_gb: float = 0.0  # bound on the `pipe:` tars cached during training (least recently used evicted); 0 = none
    max_caption_bytes: int = 16384  # longer captions are bad samples (caption_too_long), skipped before tokenising
    log_sample_keys: bool = False  # write every rank's sample keys per step to out_dir/sample_keys/


@dataclass
class ModelConfig:
    name: str = "clip-tiny"  # clip: an open_clip model name (configs/model/*.json too); supervised / simmim: a
    #                          timm vit_* name, a swinv2_* name or a demo preset (pipeline/models/backbone.py)
    activation_checkpointing: bool = False
    kwargs: dict = field(default_factory=dict)  # backbone constructor arguments (timm's: num_classes, img_size...)
    # initial weights from a local copy (nothing downloads): a .safetensors / .pt / .bin file, an open_clip or
    # timm directory, or a checkpoint / run directory of ours; checked against model.name before launch
    pretrained: str = ""
    init_from: str = ""  # the older name of model.pretrained (kept as an alias)
    # LiT: frozen towers get no gradient and no optimizer state (open_clip's lock_image_tower / lock_text_tower)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0  # with lock_image: the last N layer groups of the image tower still train
    lock_image_freeze_bn_stats: bool = False  # with lock_image: BatchNorm statistics frozen too (ResNet / timm towers)
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0  # with lock_text: the last N layer groups (projection, last block...) train
    patch_dropout: float = 0.0  # CLIP ViT image towers: FLIP's fraction of patches dropped in training (0 = off)


@dataclass
class LossConfig:
    name: Literal["clip", "siglip"] = "clip"  # softmax over all ranks' pairs, or the sigmoid loss on a ring
    logit_scale_max: float = 100.0  # exp(t') is clamped here; the gradient is 0 beyond the clamp
    siglip_init_scale: float = 10.0  # siglip: exp(t') at initialisation (SigLIP's t' = log 10)
    siglip_init_bias: float = -10.0  # siglip: b at initialisation (SigLIP's -10, chosen for batches of 32k)
    siglip_bias_lr_scale: float = 1.0  # siglip: b's lr is train.lr x this (Adam moves b by about lr a step)
    label_smoothing: float = 0.0  # supervised
    mixup: float = 0.0  # supervised: mixup Beta(a, a) alpha; 0 = off
    cutmix: float = 0.0  # supervised: cutmix alpha; 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed
    mix_switch_prob: float = 0.5  # with both on: probability of cutmix rather than mixup


@dataclass
class AugConfig:
    """Training image augmentation of the backbone tasks (timm's create_transform)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str = ""  # e.g. rand-m9-mstd0.5-inc1
    re_prob: float = 0.0  # random erasing
    eval_crop_pct: float = 0.0  # 0 = the model's default


@dataclass
class SimMIMConfig:
    mask_ratio: float = 0.6  # exact fraction of mask patches masked per image
    mask_patch_size: int = 32  # pixels; a multiple of the model's patch size
    norm_target_window: int = 0  # odd window of the normalised pixel target (47 in SwinV2's recipe); 0 = raw


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per rank and micro-step
    global_batch_size: int = 0  # if > 0, overrides batch_size = global / (world_size * grad_accum)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: Literal[0, 1, 2, 3] = 1  # on one rank the step is always stage 0's (nothing to partition)
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile); the first steps compile
    cudnn_benchmark: bool = True  # GPU: let cuDNN pick the fastest convolution algorithms for the shapes seen
    tf32: bool = True  # GPU: fp32 matmuls / convolutions (outside autocast) in TF32
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch profiler trace of steps a..b
    profile_ranks: list[int] = field(default_factory=lambda: [0])  # ranks that write a trace (out_dir/profile/)
    sync_debug: Literal["off", "warn", "error"] = "off"  # GPU: torch.cuda.set_sync_debug_mode between log steps
    lr_schedule: Literal["cosine", "linear", "multistep"] = "cosine"  # after the linear warmup
    lr_milestones: list[int] = field(default_factory=list)  # multistep: steps where lr *= lr_gamma
    lr_gamma: float = 0.1
    peak_tflops: float = 0.0  # per-device peak for the MFU metric; 0 = from the GPU's name (H100/H200/A100 bf16)
    layer_decay: float = 1.0  # layer-wise lr decay (1 = off); lr x decay^(depth - layer), per CLIP tower
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off; e.g. 0.9998): saved, evaluated
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200  # 0: only at the end
    keep_last: int = 3
    resume: str = "none"  # none | auto | path of a checkpoint directory
    overwrite: bool = False  # a fresh run may replace the checkpoints and metrics of another run in out_dir
    max_nonfinite_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or grad norm
    eval_at_end: bool = True
    progress: bool = True  # a tqdm bar when stderr is a terminal; otherwise (SLURM logs) a line every log_every
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # and/or wandb (if installed)
    wandb_project: str = "pipeline"  # wandb: the run is named after out_dir and resumes with it


@dataclass
class EvalConfig:
    every: int = 0  # also evaluate every this many steps (0: only at the end, train.eval_at_end)
    batch_size: int = 256
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    knn_k: int = 20  # backbones: kNN on frozen pooled features (0 = off)
    knn_temperature: float = 0.07
    knn_train_samples: int = 10000  # training samples that form the kNN memory / probe set (0 = all)
    linear_probe_epochs: int = 0  # 0 = no linear probe
    linear_probe_lr: float = 0.1
    linear_probe_wd: float = 0.0
    random_init_baseline: bool = False  # backbones: also probe the same architecture at its initial weights


@dataclass
class ImageBindConfig:
    towers: str = ""  # open_clip directory of the image + text towers (e.g. `pipeline export` output)
    modalities: list[str] = field(default_factory=lambda: ["audio"])  # each bound to the image embeddings
    preset: Literal["tiny", "huge"] = "tiny"  # encoder sizes: demo-sized, or ImageBind-Huge's
    freeze_towers: bool = True  # as ImageBind; false trains the towers too at lr x tower_lr_scale
    tower_lr_scale: float = 0.1
    clip_seconds: float = 1.0  # audio clip length fed to the encoder
    sample_rate: int = 16000  # audio is resampled to this rate
    depth_scale: float = 1000.0  # 16-bit depth PNG units per metre


@dataclass
class RunConfig:
    task: str = "clip"  # what is trained: a key of pipeline/tasks/registry.py's TASKS
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    imagebind: ImageBindConfig = field(default_factory=ImageBindConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:  # "1" from the command line should match 1
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}={value!r} must be a mapping")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {getattr(tp, '__name__', tp)}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}; valid keys: {', '.join(prefix + n for n in names)}")
        tp = hints[k]
        kwargs[k] = _build(tp, v, f"{key}.") if dataclasses.is_dataclass(tp) else _coerce(v, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{p}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Reads a YAML file (or starts from the defaults when path is None) and applies `a.b=value` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    cfg = _build(RunConfig, tree, "")
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    # The registry imports the task modules, which import this one: it is read when a config is checked
    from pipeline.tasks.registry import task_class

    task = task_class(cfg.task)  # an unknown name: ConfigError listing the registered ones
    t = cfg.train
    positive = {
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every, "train.keep_last": t.keep_last, "eval.batch_size": cfg.eval.batch_size,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}={v} must be > 0")
    # nan compares False with everything: each float is checked finite first, then for its range
    for key, v in {"train.lr": t.lr, "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay,
                   "train.eps": t.eps, "train.grad_clip": t.grad_clip, "loss.logit_scale_max": cfg.loss.logit_scale_max,
                   "train.lr_gamma": t.lr_gamma, "train.peak_tflops": t.peak_tflops}.items():
        if not math.isfinite(v):
            raise ConfigError(f"{key}={v} must be a finite number")
    for key, v in {"train.lr": t.lr, "loss.logit_scale_max": cfg.loss.logit_scale_max, "train.eps": t.eps}.items():
        if v <= 0:
            raise ConfigError(f"{key}={v} must be > 0")
    if t.seed < 0:
        raise ConfigError(f"train.seed={t.seed} must be >= 0 (numpy seeds are unsigned)")
    for key, v in {"train.min_lr": t.min_lr, "train.warmup_steps": t.warmup_steps, "train.ckpt_every": t.ckpt_every,
                   "train.grad_clip": t.grad_clip, "train.weight_decay": t.weight_decay,
                   "data.workers": cfg.data.workers, "train.global_batch_size": t.global_batch_size,
                   "data.cache_max_gb": cfg.data.cache_max_gb}.items():
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]):
        raise ConfigError(f"train.profile_steps={t.profile_steps} must be [first, last] steps, 1 <= first <= last")
    if not 0 < t.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={t.layer_decay} must be in (0, 1]")
    if t.lr_milestones != sorted(t.lr_milestones):
        raise ConfigError(f"train.lr_milestones={t.lr_milestones} must be ascending")
    if cfg.simmim.norm_target_window and cfg.simmim.norm_target_window % 2 == 0:
        raise ConfigError(f"simmim.norm_target_window={cfg.simmim.norm_target_window} must be odd (or 0)")
    if cfg.loss.siglip_bias_lr_scale <= 0:
        raise ConfigError(f"loss.siglip_bias_lr_scale={cfg.loss.siglip_bias_lr_scale} must be > 0")
    if cfg.loss.siglip_init_scale <= 0:
        raise ConfigError(f"loss.siglip_init_scale={cfg.loss.siglip_init_scale} must be > 0 (it is exp(t'))")
    if not 0 < cfg.simmim.mask_ratio < 1:
        raise ConfigError(f"simmim.mask_ratio={cfg.simmim.mask_ratio} must be in (0, 1)")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas={t.betas} must be two numbers in [0, 1)")
    _check_model(cfg)
    task.check_config(cfg)
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = off)")
    if cfg.eval.every < 0:
        raise ConfigError(f"eval.every={cfg.eval.every} must be >= 0 (0: only at the end)")
    sinks = ("jsonl", "tensorboard", "wandb")
    for sink in t.report_to:
        if sink not in sinks:
            raise ConfigError(f"train.report_to: {sink!r} is not valid; choose any of {', '.join(sinks)}")
    if "wandb" in t.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.report_to: wandb is not installed (pip install wandb), or drop it from the list")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")
    if not cfg.data.pipe_max_shard_gb >= 0:
        raise ConfigError(f"data.pipe_max_shard_gb={cfg.data.pipe_max_shard_gb} must be >= 0 (0 = no limit)")
    if cfg.data.max_caption_bytes <= 0:
        raise ConfigError(f"data.max_caption_bytes={cfg.data.max_caption_bytes} must be > 0")


def _check_model(cfg: RunConfig) -> None:
    m = cfg.model
    if m.init_from and m.pretrained and m.init_from != m.pretrained:
        raise ConfigError(f"model.init_from={m.init_from!r} and model.pretrained={m.pretrained!r} disagree; "
                          f"model.init_from is the older name of model.pretrained: set only one")
    m.pretrained = m.pretrained or m.init_from
    m.init_from = ""
    if not 0 <= m.patch_dropout < 1:
        raise ConfigError(f"model.patch_dropout={m.patch_dropout} must be in [0, 1)")
    for key, v in {"model.lock_image_unlocked_groups": m.lock_image_unlocked_groups,
                   "model.lock_text_unlocked_layers": m.lock_text_unlocked_layers}.items():
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    if (m.lock_image_unlocked_groups or m.lock_image_freeze_bn_stats) and not m.lock_image:
        raise ConfigError("model.lock_image_unlocked_groups / lock_image_freeze_bn_stats need model.lock_image=true")
    if m.lock_text_unlocked_layers and not m.lock_text:
        raise ConfigError("model.lock_text_unlocked_layers needs model.lock_text=true")


def resolve_batch(cfg: RunConfig, world_size: int) -> None:
    """Applies train.global_batch_size for this world size; fails if it does not divide evenly."""
    t = cfg.train
    if t.global_batch_size:
        per_step = world_size * t.grad_accum
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible across ranks: "
                f"world_size ({world_size}) x train.grad_accum ({t.grad_accum}) = {per_step}")
        t.batch_size = t.global_batch_size // per_step
    else:
        t.global_batch_size = t.batch_size * world_size * t.grad_accum


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
