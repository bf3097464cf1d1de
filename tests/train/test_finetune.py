"""Fine-tuning from our own export (one rank, CPU): model.pretrained starts at the exporting run's trained loss;
a LiT run (model.lock_image) leaves the image tower bitwise unchanged while the text tower trains; the weight
EMA equals the hand-computed average of the checkpointed weights, resumes exactly and exports with --ema.

The data is one batch (32 pairs): every step scores the same set of pairs (the CLIP loss does not depend on
their order), so the exported weights' first loss must equal the exporting run's last up to its last update,
which the cosine schedule has shrunk to ~0."""
import json
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_CONFIG, run_pipeline
from pipeline.__main__ import main as export_main  # the CLI in-process: no interpreter start-up per export
from pipeline.export import consolidated_state_dict
from pipeline.train.ema import read_ema
from pipeline.train.metrics import read_metrics


def _overrides(data, out, **extra):
    base = {"data.train": data["train"], "data.val": "", "data.classes": "", "train.out_dir": out,
            "train.batch_size": 32, "train.log_every": 1, "train.progress": "false", "data.workers": 1,
            "train.resume": "none", "train.eval_at_end": "false"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(data, out, **extra):
    return run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", "1", *_overrides(data, out, **extra))


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    from pipeline.demo_data.shapes import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("one_batch"), train_samples=32, val_samples=32,
                              samples_per_shard=32)


@pytest.fixture(scope="module")
def exported(one_batch, tmp_path_factory):
    """A 30-step run on the one batch, exported to an open_clip directory."""
    root = tmp_path_factory.mktemp("exporter")
    _train(one_batch, root / "run", **{"train.steps": 30, "train.warmup_steps": 3, "train.lr": 2e-3,
                                       "train.ckpt_every": 0})
    assert export_main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "export")]) == 0
    return root


LIT = {"model.lock_image": "true", "train.steps": 3, "train.warmup_steps": 1, "train.lr": 1e-3,
       "train.ckpt_every": 1, "train.keep_last": 5, "train.ema_decay": 0.5}


@pytest.fixture(scope="module")
def lit(one_batch, exported, tmp_path_factory):
    """3 LiT steps from the export, with the weight EMA, a checkpoint every step."""
    out = tmp_path_factory.mktemp("lit")
    _train(one_batch, out, **{"model.pretrained": exported / "export", **LIT})
    return out


def _ckpt(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


def test_pretrained_export_starts_at_its_trained_loss(exported, lit):
    trained = _losses(exported / "run")
    first = _losses(lit)[0]
    assert trained[-1] < 0.5 * trained[0]  # the exporting run learnt something the fine-tune must inherit
    assert abs(first - trained[-1]) <= 0.05 * trained[-1], (first, trained[-1])


def test_lit_leaves_the_locked_tower_bitwise_unchanged(exported, lit):
    start = load_file(str(exported / "export" / "open_clip_model.safetensors"))
    end = consolidated_state_dict(_ckpt(lit, 3))
    visual = [k for k in start if k.startswith("visual.")]
    assert visual and all(torch.equal(end[k], start[k]) for k in visual)
    text = [k for k in start if not k.startswith(("visual.", "logit_"))]
    changed = [k for k in text if not torch.equal(end[k], start[k])]
    assert len(changed) == len(text), set(text) - set(changed)  # every text tensor trained


def test_ema_is_the_average_of_the_checkpointed_weights(exported, lit):
    decay = LIT["train.ema_decay"]
    average = load_file(str(exported / "export" / "open_clip_model.safetensors"))  # the weights at step 0
    for step in (1, 2, 3):
        weights = consolidated_state_dict(_ckpt(lit, step))
        average = {k: decay * v + (1 - decay) * weights[k].reshape(v.shape) for k, v in average.items()}
        saved = read_ema(_ckpt(lit, step))
        assert set(saved) == {k for k in average if not k.startswith("visual.")}  # every trained tensor; frozen: not
        for k, v in saved.items():
            torch.testing.assert_close(v.reshape(average[k].shape), average[k], rtol=0, atol=1e-6, msg=k)


def test_resume_restores_the_ema_exactly(one_batch, exported, lit, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(_ckpt(lit, 2), _ckpt(out, 2))
    _train(one_batch, out, **{"model.pretrained": exported / "export", **LIT, "train.resume": "auto"})
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3]
    resumed, uninterrupted = read_ema(_ckpt(out, 3)), read_ema(_ckpt(lit, 3))
    assert resumed.keys() == uninterrupted.keys() and resumed  # (the key set itself: the test above)
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_export_ema(exported, lit, tmp_path, capsys):
    assert export_main(["export", "--checkpoint", str(lit), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    model, *_ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ema'}")
    saved, raw = read_ema(_ckpt(lit, 3)), consolidated_state_dict(_ckpt(lit, 3))
    for k, v in model.state_dict().items():
        expected = saved[k] if k in saved else raw[k]
        if k == "logit_scale":  # the export clamps t' at log(logit_scale_max)
            expected = expected.clamp(max=torch.log(torch.tensor(100.0)))
        assert torch.equal(v, expected.reshape(v.shape)), k
    assert json.loads((tmp_path / "ema" / "open_clip_config.json").read_text())["pipeline"]["weights"] == "ema"
    capsys.readouterr()
    rc = export_main(["export", "--checkpoint", str(exported / "run"), "--out", str(tmp_path / "none"), "--ema"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --ema:") and err.count("\n") == 1 and "holds no weight EMA" in err
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_two_rank_zero1_lit_text_patch_dropout_layer_decay_ema(demo_data, exported, tmp_path):
    """The same on 2 ranks under ZeRO-1 (DeepSpeed's flat partitioned buffers): the locked text tower stays
    bitwise, every image tensor trains, and the EMA is still the average of the consolidated weights."""
    out = tmp_path / "run"
    run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", "2", *_overrides(demo_data, out, **{
        "model.pretrained": exported / "export", "model.lock_text": "true", "model.patch_dropout": 0.5,
        "train.layer_decay": 0.8, "train.zero_stage": 1, "train.batch_size": 16, "train.steps": 3,
        "train.warmup_steps": 1, "train.ckpt_every": 1, "train.keep_last": 5, "train.ema_decay": 0.5}))
    start = load_file(str(exported / "export" / "open_clip_model.safetensors"))
    average = dict(start)
    for step in (1, 2, 3):
        weights = consolidated_state_dict(_ckpt(out, step))
        average = {k: 0.5 * v + 0.5 * weights[k].reshape(v.shape) for k, v in average.items()}
        saved = read_ema(_ckpt(out, step))
        assert set(saved) == {k for k in start if k.startswith(("visual.", "logit_"))}
        for k, v in saved.items():
            torch.testing.assert_close(v.reshape(average[k].shape), average[k], rtol=0, atol=1e-6, msg=k)
    text = [k for k in start if not k.startswith(("visual.", "logit_"))]
    assert all(torch.equal(weights[k], start[k]) for k in text)
    assert all(not torch.equal(weights[k], start[k]) for k in start if k.startswith("visual."))
