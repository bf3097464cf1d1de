"""What every task class shares: the checks of model options that belong to other tasks, and building a task
from a checkpoint (its config.yaml, its consolidated weights) for `python -m pipeline eval` and `export`.

A task class (the `Task` protocol in pipeline/tasks/__init__.py) subclasses `TaskBase` and overrides what differs;
pipeline/tasks/registry.py maps each `task:` name to its class.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError, RunConfig


class TaskBase:
    evaluates_on_all_ranks = False  # evaluate() runs on rank 0 alone; True: every rank takes a share
    # the config keys evaluate() reads its data from; `python -m pipeline eval` names the empty ones
    eval_data_keys: tuple[str, ...] = ("data.val",)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Checks of the values alone (no files read), run by load_config. By default: the model options that
        only the image-text task has (LiT locking, patch dropout) are refused."""
        m = cfg.model
        used = [k for k, on in (("model.lock_image", m.lock_image), ("model.lock_text", m.lock_text),
                                ("model.patch_dropout", m.patch_dropout)) if on]
        if used:
            raise ConfigError(f"{', '.join(used)} apply to task=clip only (task={cfg.task})")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """The checks that can run before a process group starts (names, files); raises ConfigError."""

    def batch_flops(self, samples: int, stats: dict) -> float:
        """Model FLOPs (forward + backward) of one micro-batch of `samples` samples over all ranks, whose loss gave
        `stats`: what the logged TFLOP/s and MFU count. By default every sample costs `flops_per_sample`."""
        return samples * self.flops_per_sample

    @classmethod
    def plan_model(cls, cfg: RunConfig) -> torch.nn.Module:
        """The model with every tensor on the meta device, for `python -m pipeline plan`."""
        from pipeline.plan import PlanError

        raise PlanError(f"plan estimates image-text models (task=clip); task={cfg.task} has no estimate yet")

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, ema: bool = False, cfg: RunConfig | None = None):
        """The task its config (`cfg`, else the checkpoint's config.yaml) describes, holding the checkpoint's (a
        run directory: its newest checkpoint's) consolidated weights (its weight EMA if `ema`). The weights are
        read first: checkpoint_weights vets every file before anything is unpickled (pipeline/train/checkpoint.py),
        and a refused checkpoint costs no model build. The run's initial weights (model.pretrained) are not read:
        the checkpoint's replace them."""
        from pipeline.config import load_config
        from pipeline.export import checkpoint_config, checkpoint_weights, weights_fit
        from pipeline.models.clip import load_state_dict_reshaped
        from pipeline.train.checkpoint import resolve_checkpoint

        ckpt = resolve_checkpoint(ckpt)
        state = checkpoint_weights(ckpt, ema)
        cfg = cfg if cfg is not None else load_config(ckpt / "config.yaml")
        cfg.model.pretrained = ""
        task = cls(cfg)
        with weights_fit(ckpt, checkpoint_config(ckpt)):
            load_state_dict_reshaped(task.model, state)
        return task

    @classmethod
    def export(cls, checkpoint: str | Path, out_dir: str | Path, ema: bool = False) -> Path:
        """Writes the checkpoint in the format this task's users load; returns the directory."""
        raise NotImplementedError(f"{cls.__name__} has no export")

    @classmethod
    def export_written(cls, out: Path) -> str:
        """The line `python -m pipeline export` prints: where the export is and how to load it."""
        return f"export written: {out}"

    @classmethod
    def run_demo(cls, out: Path, config: Path, steps: int | None, nproc: int, train_samples: int | None) -> dict:
        """`python -m pipeline demo` with this task's config: the image demo data, training, evaluation, export."""
        from pipeline.demo import run_task_demo

        return run_task_demo(out, config, steps=steps, nproc=nproc, train_samples=train_samples)
