"""The tasks by name: the config's `task:` is a key of `TASKS`, and every verb (train, eval, export, demo, plan)
finds the task class here. Adding a task is one module with its class and one line in `TASKS`
(docs/extending.md).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.export import checkpoint_config
from pipeline.tasks.backbone import SimMIMTask, SupervisedTask
from pipeline.tasks.contrastive import ContrastiveTask
from pipeline.tasks.imagebind import ImageBindTask
from pipeline.train.checkpoint import CheckpointError, resolve_checkpoint

TASKS: dict[str, type] = {
    "clip": ContrastiveTask,  # image-text contrastive (CLIP / SigLIP), pipeline/tasks/contrastive.py
    "imagebind": ImageBindTask,  # modality encoders bound to frozen image embeddings, pipeline/tasks/imagebind.py
    "supervised": SupervisedTask,  # backbone classification, pipeline/tasks/backbone.py
    "simmim": SimMIMTask,  # masked image modelling of a backbone, pipeline/tasks/backbone.py
}


def task_class(name: str) -> type:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task={name!r} is not valid; choose one of {', '.join(TASKS)}") from None


def check_task(cfg: RunConfig) -> None:
    """The task-specific checks that can run before a process group starts."""
    task_class(cfg.task).check(cfg)


def build_task(cfg: RunConfig):
    return task_class(cfg.task)(cfg)


def checkpoint_task(ckpt: Path) -> type:
    """The class of the task a checkpoint's run trained (its config.yaml; configs older than `task:` are CLIP's)."""
    name = checkpoint_config(ckpt).get("task", "clip")
    if name not in TASKS:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: task={name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = False) -> Path:
    """Exports a checkpoint (or a run directory's newest) in the format its task's users load: open_clip (clip),
    ImageBind encoders, timm (backbones); `ema`: the weight EMA (train.ema_decay) instead of the raw weights."""
    ckpt = resolve_checkpoint(checkpoint)
    return checkpoint_task(ckpt).export(ckpt, out_dir, ema)
