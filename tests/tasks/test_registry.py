"""A task added the way docs/extending.md says (one class, one entry in TASKS) trains in the real loop and goes
through `python -m pipeline eval` and `export` with no other change: the verbs find it in the registry. The task
here is a toy regression on the demo pictures: their mean colour, from 16 x 16 pixels, by one linear layer."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.__main__ import main
from pipeline.config import RunConfig
from pipeline.data.decoders import image_member
from pipeline.data.loader import ShardSet, expand_shards, local_shards
from pipeline.tasks.base import TaskBase
from pipeline.tasks.registry import TASKS
from pipeline.train.metrics import read_metrics

SIDE = 16


class MeanColourDecoder:
    def sample(self, raw: dict[str, bytes]) -> dict:
        image = Image.open(io.BytesIO(image_member(raw))).convert("RGB").resize((SIDE, SIDE))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div(255)
        pixels = pixels.reshape(SIDE, SIDE, 3).permute(2, 0, 1)
        return {"images": pixels, "targets": pixels.mean(dim=(1, 2))}

    def collate(self, samples: list[dict]) -> dict:
        return {k: torch.stack([s[k] for s in samples]) for k in ("images", "targets")}

    def to_device(self, batch: dict, device, dtype: torch.dtype) -> dict:
        return {k: batch[k].to(device, dtype) for k in ("images", "targets")}


class MeanColourTask(TaskBase):
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.data.val:
            expand_shards(cfg.data.val, "data.val")

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIDE * SIDE, 3))
        self.decoder = MeanColourDecoder()
        self.flops_per_sample = 6 * 3 * SIDE * SIDE * 3

    def param_groups(self):
        return None

    def loss(self, engine, batch: dict):
        return torch.nn.functional.mse_loss(engine(batch["images"]), batch["targets"]), {}

    def evaluate(self, model: torch.nn.Module) -> dict:
        if not self.cfg.data.val:
            return {}
        shards = ShardSet(local_shards(self.cfg.data.val, "data.val", self.cfg.data))
        batch = self.decoder.collate([self.decoder.sample(shards.read(i)[1]) for i in range(shards.total)])
        model.eval()
        with torch.no_grad():
            mse = torch.nn.functional.mse_loss(model(batch["images"]), batch["targets"]).item()
        print(f"eval: mean-colour MSE {mse:.6f} over {shards.total} held-out pictures", flush=True)
        return {"mse": mse, "samples": shards.total}

    @classmethod
    def export(cls, checkpoint, out_dir, ema: bool = False) -> Path:
        from safetensors.torch import save_file

        task = cls.from_checkpoint(checkpoint, ema)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in task.model.state_dict().items()}, str(out / "model.safetensors"))
        return out


@pytest.fixture
def toy_task():
    """TASKS with the toy task for one test; afterwards as before, and no process group or rank variables left
    behind by training in this process."""
    environ = dict(os.environ)
    TASKS["toy_mean_colour"] = MeanColourTask
    yield "toy_mean_colour"
    del TASKS["toy_mean_colour"]
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def test_a_task_added_to_the_registry_trains_evaluates_and_exports(toy_task, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "task": toy_task,
        "data": {"train": demo_data["train"], "val": demo_data["val"], "workers": 0},
        "train": {"out_dir": str(out), "steps": 4, "batch_size": 16, "lr": 0.01, "warmup_steps": 1, "log_every": 1,
                  "ckpt_every": 2, "progress": False, "precision": "fp32", "report_to": ["jsonl"]},
    }))
    assert main(["train", "--config", str(config)]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    trained = json.loads((out / "eval.json").read_text())
    assert trained["samples"] == 80
    assert not torch.distributed.is_initialized()  # the verb left torch.distributed (close_process_group)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    assert "eval: mean-colour MSE" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results == pytest.approx({k: v for k, v in trained.items() if k != "step"}, abs=1e-6)

    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().out.strip() == f"export written: {tmp_path / 'export'}"
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    task = MeanColourTask.from_checkpoint(out / "checkpoints" / "step_00000004")
    assert set(exported) == {"1.weight", "1.bias"}
    for k, v in task.model.state_dict().items():
        assert torch.equal(exported[k], v), k
