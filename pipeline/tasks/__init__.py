"""What is trained: a task bundles the model DeepSpeed wraps, how samples are decoded, the loss of a batch and
the evaluation, and (as class methods) its config checks, its export and its demo. The training loop
(pipeline/train/loop.py) is the same for every task; every verb finds the task's class by the config's `task:`
in pipeline/tasks/registry.py (`TASKS`). How to add one: docs/extending.md.

- `clip`: image-text contrastive (CLIP softmax or SigLIP sigmoid loss), pipeline/tasks/contrastive.py
- `imagebind`: audio / depth / thermal / IMU encoders bound to frozen image embeddings, pipeline/tasks/imagebind.py
- `supervised`, `simmim`: ViT / SwinV2 backbones, classification or masked image modelling, pipeline/tasks/backbone.py
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

import torch

from pipeline.config import RunConfig
from pipeline.data.decoders import SampleDecoder


class Task(Protocol):
    """An instance is one run's task (built from its config); the class methods work on a config or a checkpoint
    before or without one. pipeline/tasks/base.py (`TaskBase`) has the defaults."""

    model: torch.nn.Module  # what DeepSpeed wraps (every trainable parameter lives here)
    decoder: SampleDecoder  # training samples -> batches (loader workers) -> the device (`decoder.to_device`)
    flops_per_sample: float  # forward + backward model FLOPs of a sample (TaskBase.batch_flops: what MFU counts)

    def batch_flops(self, samples: int, stats: dict) -> float:
        """Model FLOPs of one micro-batch of `samples` samples over all ranks, whose loss gave `stats` (TaskBase:
        samples x flops_per_sample; ImageBind counts each encoder on the samples carrying its modality)."""

    def param_groups(self) -> list[dict] | None:
        """AdamW parameter groups (e.g. layer-wise lr decay), or None for the default decay / no-decay split."""

    def loss(self, engine, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """Forward through `engine` and the objective; the dict holds detached scalars for the metrics. `batch` is
        already on the device, normalised and in the compute dtype: the loop calls `decoder.to_device` on each
        micro-batch first."""

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Evaluation of the (full, gathered) model; {} when the config has no held-out data. Runs on rank 0
        alone, or on every rank (each taking a share) when the task sets `evaluates_on_all_ranks = True`
        (CLIP / SigLIP: pipeline/eval/zero_shot.py)."""

    # Optional: step_losses(engine, batches, device) -> Iterator[(loss, stats)], for a task whose micro-batch
    # loss depends on the other micro-batches of the step (see `step_losses` below).

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Checks of the config's values alone, run by load_config; raises ConfigError."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The checks that can run before a process group starts (model names, files); raises ConfigError."""

    @classmethod
    def from_checkpoint(cls, ckpt, ema: bool = False, cfg: RunConfig | None = None) -> "Task":
        """The task of a checkpoint's config holding its consolidated weights (`python -m pipeline eval`)."""

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False):
        """Writes a checkpoint in the format this task's users load (`python -m pipeline export`)."""


def step_losses(task: Task, engine, batches: Iterable[dict], device: torch.device
                ) -> Iterator[tuple[torch.Tensor, dict]]:
    """The (loss, stats) of each of one optimizer step's micro-batches, in order; the loop backpropagates each
    (DeepSpeed divides it by train.grad_accum) before asking for the next. By default a micro-batch's loss is
    its own (`task.loss`); the contrastive task's spans the whole step (pipeline/train/full_batch_accumulation.py)."""
    own = getattr(task, "step_losses", None)
    if own is not None:
        return own(engine, batches, device)
    return (task.loss(engine, batch) for batch in batches)
