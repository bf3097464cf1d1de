"""ImageBind on one paired dataset per modality, mixed in one run (2 ranks, DeepSpeed ZeRO-1, frozen towers):
every encoder trains, each modality is evaluated on its own held-out set, a resumed run continues key for key,
and every encoder exports."""
import json
import shutil

import pytest
import torch
from conftest import REPO, run_pipeline

from pipeline.demo_data.multimodal import DISJOINT_MODALITIES, write_disjoint_demo_datasets
from pipeline.train.metrics import read_metrics

CONFIG = REPO / "configs/demo/imagebind_disjoint.yaml"


@pytest.fixture(scope="module")
def disjoint_data(tmp_path_factory):
    return write_disjoint_demo_datasets(tmp_path_factory.mktemp("disjoint"), train_samples=40, val_samples=12,
                                        samples_per_shard=20)


def _train(data, out, *extra):
    run_pipeline("train", "--config", CONFIG, "--nproc-per-node", "2", f"data.train={data['train']}",
                 f"data.val={data['val']}", f"data.classes={data['classes']}", f"train.out_dir={out}",
                 "imagebind.towers=clip-tiny", "train.steps=6", "train.batch_size=8", "train.warmup_steps=1",
                 "train.log_every=1", "train.ckpt_every=3", "train.progress=false", "train.seed=5",
                 "data.log_sample_keys=true", "data.shuffle_block=64", *extra)


def _sample_keys(out, rank):
    lines = (out / "sample_keys" / f"rank_{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_mixed_modalities_train_resume_key_for_key_and_export(disjoint_data, tmp_path):
    a = tmp_path / "a"
    _train(disjoint_data, a)
    records = {r["step"]: r for r in read_metrics(a / "metrics.jsonl")}
    assert sorted(records) == list(range(1, 7))
    per_step = [sum(r[f"samples/{m}"] for m in DISJOINT_MODALITIES) for r in records.values()]
    assert per_step == [16] * 6  # every sample carries exactly one modality; all four sources are drawn
    for m in DISJOINT_MODALITIES:
        assert sum(r[f"samples/{m}"] for r in records.values()) > 0
    # the logged TFLOP/s count each encoder on its own modality's samples only, not every encoder on every sample
    from pipeline.config import load_config
    from pipeline.tasks.registry import build_task

    task = build_task(load_config(CONFIG, ["imagebind.towers=clip-tiny", f"data.classes={disjoint_data['classes']}"]))
    for r in records.values():
        step_flops = r["tflops_per_s"] * 1e12 / r["samples_per_s"] * 16  # the same elapsed time in both
        assert step_flops == pytest.approx(task.batch_flops(16, r), rel=1e-9)
        assert step_flops < 16 * task.flops_per_sample
    results = json.loads((a / "eval.json").read_text())
    for m in DISJOINT_MODALITIES:  # each on its own held-out set of 12
        assert results[f"{m}_samples"] == 12 and results[f"{m}_zero_shot_chance"] == pytest.approx(1 / 40)
        assert 0 <= results[f"{m}_zero_shot_top1"] <= 1 and f"text2{m}_R@1" in results

    # resume from the step-3 checkpoint in a fresh directory: steps 4-6 equal the uninterrupted run's
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_00000003", b / "checkpoints" / "step_00000003")
    (b / "checkpoints" / "latest").write_text("step_00000003")
    _train(disjoint_data, b, "train.resume=auto", "train.eval_at_end=false")
    resumed = {r["step"]: r for r in read_metrics(b / "metrics.jsonl")}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ["loss", *(f"samples/{m}" for m in DISJOINT_MODALITIES),
                    *(f"loss/{m}" for m in DISJOINT_MODALITIES if f"loss/{m}" in records[step])]:
            assert resumed[step][key] == pytest.approx(records[step][key], abs=1e-5), (step, key)
    for rank in (0, 1):
        keys_a, keys_b = _sample_keys(a, rank), _sample_keys(b, rank)
        assert {s: keys_b[s] for s in (4, 5, 6)} == {s: keys_a[s] for s in (4, 5, 6)}

    export = tmp_path / "export"
    run_pipeline("export", "--checkpoint", a, "--out", export)
    from pipeline.models.imagebind import load_encoder, load_imagebind

    model = load_imagebind(export)[0]
    state = torch.load(a / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    assert sorted(model.encoders) == sorted(DISJOINT_MODALITIES)
    for m in DISJOINT_MODALITIES:
        enc = load_encoder(export / m)
        assert enc.config.modality == m
        for k, v in enc.state_dict().items():
            assert torch.equal(v, state[f"encoders.{m}.{k}"].reshape(v.shape).float()), (m, k)
