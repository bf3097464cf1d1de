"""Checkpoint directories built by hand, in the layout the trainer writes (DeepSpeed's stage-0 module file, the
resolved config, `latest`), for attacks that need no training run: planted pickles, foreign `latest` names,
non-finite weights, another task's config."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import yaml

from conftest import DEMO_CONFIG
from pipeline.config import load_config, to_dict


class WritesMarker:
    """Unpickling this object creates `path`: the evidence that a load ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def clip_state() -> dict[str, torch.Tensor]:
    from pipeline.models.clip import create_clip

    torch.manual_seed(0)
    return create_clip("clip-tiny")[0].state_dict()


def write_checkpoint(run_dir: Path, step: int = 1, state: dict | None = None, config: dict | None = None,
                     extra: dict | None = None) -> Path:
    """run_dir/checkpoints/step_XXXXXXXX/ with mp_rank_00_model_states.pt ({"module": state, **extra}) and
    config.yaml (the demo config unless given); `latest` names it."""
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"module": clip_state() if state is None else state, "dp_world_size": 1, **(extra or {})},
               ckpt / "mp_rank_00_model_states.pt")
    cfg = config or to_dict(load_config(DEMO_CONFIG))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (ckpt.parent / "latest").write_text(ckpt.name)
    return ckpt


def plant_pickle(path: Path, marker: Path, as_torch_file: bool = True) -> None:
    """Replaces `path` with a file whose loading with weights_only=False creates `marker`."""
    if as_torch_file:
        torch.save({"module": {}, "rng": WritesMarker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"rng": WritesMarker(marker)}))
