"""ImageBind training through the real loop: 2 ranks, DeepSpeed, two modalities, frozen towers."""
import json

import pytest
import torch
from conftest import REPO, run_pipeline

from pipeline.demo_data.multimodal import write_multimodal_demo_dataset
from pipeline.models.clip import create_clip
from pipeline.train.metrics import read_metrics


@pytest.fixture(scope="module")
def multimodal_data(tmp_path_factory):
    return write_multimodal_demo_dataset(tmp_path_factory.mktemp("mm"), train_samples=256, val_samples=64,
                                         samples_per_shard=100)


def test_two_modalities_bind_on_two_ranks_with_towers_bitwise_frozen(multimodal_data, tmp_path):
    out = tmp_path / "run"
    run_pipeline("train", "--config", REPO / "configs/demo/imagebind_audio_depth.yaml", "--nproc-per-node", "2",
                 f"data.train={multimodal_data['train']}", f"data.val={multimodal_data['val']}",
                 f"data.classes={multimodal_data['classes']}", f"train.out_dir={out}", "imagebind.towers=clip-tiny",
                 "train.steps=4", "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1",
                 "train.progress=false", "train.seed=3")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"loss/audio", "loss/depth", "logit_scale/audio"} <= set(r) for r in records)
    assert records[0]["logit_scale/audio"] == pytest.approx(20.0)  # ImageBind's fixed audio temperature
    results = json.loads((out / "eval.json").read_text())
    assert {"audio_zero_shot_top1", "depth_zero_shot_top1", "audio2image_R@1"} <= set(results)

    ckpt = out / "checkpoints" / "step_00000004"
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    torch.manual_seed(3)  # the towers as the run built them (random clip-tiny, seed 3), before any step
    towers, *_ = create_clip("clip-tiny")
    for name, value in towers.state_dict().items():
        assert torch.equal(state[f"clip.{name}"].reshape(value.shape), value), name

    export = tmp_path / "export"
    run_pipeline("export", "--checkpoint", out, "--out", export)
    from pipeline.models.imagebind import load_encoder, load_imagebind

    model = load_imagebind(export)[0]
    audio = load_encoder(export / "audio")
    x = torch.randn(2, *audio.config.input_size).unsqueeze(1)
    with torch.no_grad():
        assert torch.allclose(audio(x), model.encoders["audio"](x))
        for k, v in audio.state_dict().items():
            assert torch.equal(v, state[f"encoders.audio.{k}"].reshape(v.shape)), k

    # `python -m pipeline eval` on the run: the task's own evaluation, the trainer's numbers at its last step
    proc = run_pipeline("eval", "--checkpoint", out, "--out", tmp_path / "eval.json")
    assert "eval audio: " in proc.stdout and "eval depth: " in proc.stdout
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again.keys() == results.keys() - {"step"}
    for k, v in again.items():  # per-modality counts of skipped samples are dicts: compared as they are
        assert v == (pytest.approx(results[k], abs=1e-6) if isinstance(v, float) else results[k]), k


def test_decoder_keeps_each_samples_own_modalities_and_their_rows():
    from pipeline.config import RunConfig
    from pipeline.data.errors import BadSample
    from pipeline.demo_data.multimodal import render_paired_sample
    from pipeline.tasks.imagebind import ImageBindTask

    cfg = RunConfig(task="imagebind")
    cfg.imagebind.towers, cfg.imagebind.modalities = "clip-tiny", ["audio", "depth", "thermal", "imu"]
    task = ImageBindTask(cfg)
    order = ["imu", "audio", "imu", "thermal", "audio"]
    raws = [{k: (v.encode() if isinstance(v, str) else v) for k, v in render_paired_sample(m, 0, "val", i).items()}
            for i, m in enumerate(order)]
    batch = task.decoder.collate([task.decoder.sample(r) for r in raws])
    assert batch["images"].shape[0] == 5
    assert batch["imu_rows"].tolist() == [0, 2] and batch["audio_rows"].tolist() == [1, 4]
    assert batch["thermal_rows"].tolist() == [3] and "depth" not in batch and "depth_rows" not in batch
    assert batch["imu"].shape == (2, 6, 400) and batch["thermal"].shape == (1, 1, 48, 48)
    assert batch["audio"].shape == (2, 1, 64, 100)
    with pytest.raises(BadSample, match="missing_modality"):  # the picture alone binds nothing
        task.decoder.sample({k: v for k, v in raws[0].items() if k != "imu.npy"})
