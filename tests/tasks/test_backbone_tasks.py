"""Supervised ViT and SimMIM SwinV2 pretraining through the real loop (2 ranks, DeepSpeed, gloo), exported as
timm directories that timm loads strictly with equal outputs."""
import json

import pytest
import timm
import torch
from conftest import REPO, run_pipeline

from pipeline.export import consolidated_state_dict
from pipeline.models.backbone import create_backbone
from pipeline.train.metrics import read_metrics


def _run(demo_data, config, out, *extra):
    run_pipeline("train", "--config", REPO / "configs" / "demo" / config, "--nproc-per-node", "2",
                 f"data.train={demo_data['train']}", f"data.val={demo_data['val']}",
                 f"data.classes={demo_data['classes']}", f"train.out_dir={out}", "train.batch_size=16",
                 "train.warmup_steps=1", "train.log_every=1", "train.progress=false", "eval.knn_train_samples=200",
                 *extra)
    return read_metrics(out / "metrics.jsonl"), json.loads((out / "eval.json").read_text())


def _export_and_compare(out, tmp_path, expected_keys):
    export = tmp_path / "timm"
    run_pipeline("export", "--checkpoint", out, "--out", export)
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    state = consolidated_state_dict(out / "checkpoints" / "step_00000006")
    state = {k.removeprefix("encoder."): v for k, v in state.items() if k in expected_keys or
             k.removeprefix("encoder.") in expected_keys}
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    return model


def _eval_verb(out, tmp_path, results):
    """`python -m pipeline eval --checkpoint RUN` prints the task's metrics, the trainer's at its last step."""
    proc = run_pipeline("eval", "--checkpoint", out, "--out", tmp_path / "eval.json")
    assert "eval: " in proc.stdout and "kNN top-1" in proc.stdout
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again == pytest.approx({k: v for k, v in results.items() if k != "step"}, abs=1e-6)
    return proc.stdout


def test_supervised_vit_trains_evaluates_and_exports_to_timm(demo_data, tmp_path):
    out = tmp_path / "vit"
    records, results = _run(demo_data, "vit_supervised.yaml", out, "train.steps=6", "train.layer_decay=0.75",
                            "eval.linear_probe_epochs=5", "train.peak_tflops=0.5")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:  # MFU: achieved model TFLOP/s per device (2 ranks) over the stated peak
        assert r["tflops_per_s"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_s"] / 2 / 0.5)
    assert all(3.0 < r["loss"] < 5.0 for r in records)  # ~ln 40 at the start: 6 steps do not yet learn 40 classes
    assert {"top1", "top5", "knn_top1", "probe_top1"} <= set(results) and results["classes"] == 40
    torch.manual_seed(0)  # the run's seed: the initial weights, which training must have moved
    reference = create_backbone("demo_vit")
    model = _export_and_compare(out, tmp_path, set(reference.state_dict()))
    assert not torch.equal(model.head.weight, reference.head.weight)
    x = torch.randn(2, 3, 64, 64)
    reference.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(x), atol=1e-5)
    assert "classifier top-1" in _eval_verb(out, tmp_path, results)


def test_simmim_swinv2_reconstructs_and_exports_its_encoder(demo_data, tmp_path):
    out = tmp_path / "simmim"
    records, results = _run(demo_data, "swinv2_simmim.yaml", out, "train.steps=6", "eval.linear_probe_epochs=0")
    assert records[-1]["loss"] < records[0]["loss"]
    assert results["recon_l1"] < results["recon_l1_mean_baseline"] * 1.5 and "knn_top1" in results
    encoder = create_backbone("demo_swinv2", num_classes=0)
    model = _export_and_compare(out, tmp_path, set(encoder.state_dict()))
    assert model.num_classes == 0
    assert "held-out masked L1" in _eval_verb(out, tmp_path, results)
