import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU machines; set before any
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernel module is imported (jit reads it at decoration)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "clip_tiny.yaml"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run by default where CUDA is present and are skipped (with the reason) where it is not."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the Triton kernels under test run: the GPU when there is one, else the CPU under TRITON_INTERPRET=1.
    Every kernel test builds its tensors here, so one suite serves both machines."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 results are judged at ~1e-5 against float64: GEMMs must be IEEE fp32, not TF32 (which GPU training
    runs switch on process-wide), whatever ran before in this process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small copy of the demo dataset: 7 uneven train shards (6 x 90 + 1 x 20), 1 val shard."""
    from pipeline.demo_data.shapes import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo_data"), train_samples=560, val_samples=80,
                              samples_per_shard=90)


def run_pipeline(*args, timeout=600, env=None, check=True):
    """Runs `python -m pipeline ...` in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_overrides(demo_data, out_dir, **extra):
    """Overrides for a fast test run of the demo config on the small dataset."""
    base = {"data.train": demo_data["train"], "data.val": demo_data["val"], "data.classes": demo_data["classes"],
            "train.out_dir": out_dir, "train.batch_size": 16, "train.steps": 6, "train.warmup_steps": 2,
            "train.log_every": 1, "train.ckpt_every": 3, "train.progress": "false", "data.workers": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class CaptionDecoder:
    """A loader decoder that keeps only the caption: exact sample accounting without image work."""

    def sample(self, raw):
        return {"txt": raw["txt"].decode()}

    def collate(self, samples):
        return {"txt": [s["txt"] for s in samples]}
