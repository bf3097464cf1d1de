"""On a GPU, a training step between log steps never waits for the device: the host only queues work. Every task
runs a few steps through the real loop (one process, bf16) with `train.sync_debug=error`, which turns each
synchronising call (a value read back, a blocking copy) outside log and checkpoint steps into an error."""
import pytest
import torch
from conftest import REPO, run_pipeline

from pipeline.train.metrics import read_metrics

pytestmark = pytest.mark.gpu

TASKS = {  # config, extra overrides
    "clip": ("configs/demo/clip_tiny.yaml", []),
    "siglip": ("configs/siglip/tiny_demo.yaml", []),
    "clip_swinv2": ("configs/demo/clip_swinv2_tiny.yaml", []),
    # fine-tuning features: a locked tower, FLIP patch dropout, per-tower layer decay, the weight EMA's update
    "clip_lit_ema": ("configs/demo/clip_tiny.yaml", ["model.lock_text=true", "model.patch_dropout=0.5",
                                                     "train.layer_decay=0.8", "train.ema_decay=0.999"]),  # the window-attention kernel in the image tower
    "supervised": ("configs/demo/vit_supervised.yaml", ["loss.mixup=0"]),
    "supervised_mixup": ("configs/demo/vit_supervised.yaml", ["loss.mixup=0.8", "loss.cutmix=1.0"]),
    "simmim": ("configs/demo/swinv2_simmim.yaml", []),
    "imagebind": ("configs/demo/imagebind_audio_depth.yaml", ["imagebind.towers=clip-tiny"]),
}


@pytest.fixture(scope="module")
def multimodal_data(tmp_path_factory):
    from pipeline.demo_data.multimodal import write_multimodal_demo_dataset

    return write_multimodal_demo_dataset(tmp_path_factory.mktemp("mm"), train_samples=256, val_samples=64,
                                         samples_per_shard=100)


def test_sync_debug_mode_turns_a_read_back_into_an_error():
    """What the task runs rely on: on this torch build the mode does catch a synchronising call."""
    x = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("task", list(TASKS))
def test_steps_between_log_steps_do_not_synchronise(task, demo_data, multimodal_data, tmp_path):
    config, extra = TASKS[task]
    data = multimodal_data if task == "imagebind" else demo_data
    out = tmp_path / task
    run_pipeline("train", "--config", REPO / config, f"data.train={data['train']}", "data.val=", "data.classes=",
                 f"train.out_dir={out}", "train.steps=9", "train.log_every=4", "train.ckpt_every=0",
                 "train.batch_size=16", "train.warmup_steps=2", "train.progress=false", "train.eval_at_end=false",
                 "train.sync_debug=error", "train.resume=none", "data.workers=2", *extra, timeout=900)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8, 9]
    for r in records:
        assert r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["loss"] == r["loss"]
