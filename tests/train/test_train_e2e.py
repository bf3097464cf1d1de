"""Real 2-rank DeepSpeed runs on CPU (torchrun, gloo): training, checkpoints, eval, export, kill and resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import open_clip
import pytest
import torch

from conftest import DEMO_CONFIG, REPO, run_pipeline, train_overrides
from pipeline.data.eval_loader import iterate_eval_samples
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.export import consolidated_state_dict
from pipeline.models.clip import create_clip, load_state_dict_reshaped
from pipeline.train.metrics import read_metrics


def _train(demo_data, out, **extra):
    return run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", "2",
                        *train_overrides(demo_data, out, **extra))


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = _train(demo_data, out, **{"eval.every": 4})
    (out / "stdout.log").write_text(proc.stdout)  # not a terminal: plain log lines, no progress bar
    return out


def _embeddings(model, transform, tokenizer, val):
    images, captions, _ = next(iterate_eval_samples(ShardSet(expand_shards(val)), transform, 32))
    model.eval()
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokenizer(captions), normalize=True)


def test_two_rank_run_writes_metrics_checkpoints_and_eval(trained):
    records = read_metrics(trained / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac", "grad_norm"} <= r.keys()
        assert 0 < r["loss"] < 10 and r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1
    assert records[-1]["samples_seen"] == 6 * 2 * 16
    ckpts = trained / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003", "step_00000006"]
    assert {"rank_00000.pt", "rank_00001.pt", "config.yaml"} <= {p.name for p in (ckpts / "step_00000006").iterdir()}
    assert (trained / "metrics.png").stat().st_size > 1000
    assert any((trained / "tensorboard").iterdir())
    results = json.loads((trained / "eval.json").read_text())
    assert results["samples"] == 80 and results["classes"] == 40
    assert {"zero_shot_top1", "zero_shot_top5", "i2t_R@1", "t2i_R@10"} <= results.keys()
    evals = read_metrics(trained / "eval.jsonl")  # eval.every=4 and the end, each spread over both ranks
    assert [r["step"] for r in evals] == [4, 6] and evals[-1] == {"step": 6, **results}
    assert evals[0]["samples"] == 80 and evals[0] != evals[-1]


def test_non_tty_run_prints_one_line_per_log_step(trained):
    lines = [line for line in (trained / "stdout.log").read_text().splitlines() if line.startswith("step ")]
    pattern = (r"step (\d+)/6 \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| \d+\.\d samples/s \| "
               r"data-wait \d+\.\d% \| ETA \d+:\d\d:\d\d")
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3, 4, 5, 6]
    records = read_metrics(trained / "metrics.jsonl")
    assert [f"loss {r['loss']:.4f}" in line for r, line in zip(records, lines)] == [True] * 6


def test_export_loads_in_plain_open_clip_with_equal_embeddings(trained, demo_data, tmp_path):
    run_pipeline("export", "--checkpoint", trained, "--out", tmp_path / "export")
    model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")
    exported = _embeddings(model, eval_tf, tokenizer, demo_data["val"])

    # Ours: the weights as the trainer's rank 0 held them (DeepSpeed's module file, no consolidation).
    ours, _, our_tf, our_tok = create_clip("clip-tiny")
    module = torch.load(trained / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    load_state_dict_reshaped(ours, module)
    expected = _embeddings(ours, our_tf, our_tok, demo_data["val"])
    for a, b in zip(exported, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # The eval verb on the export gives exactly what the trainer measured at the end of training.
    proc = run_pipeline("eval", "--model", tmp_path / "export", "--val", demo_data["val"],
                        "--classes", demo_data["classes"], "--out", tmp_path / "eval.json")
    assert "zero-shot top-1" in proc.stdout
    ours_eval = json.loads((tmp_path / "eval.json").read_text())
    train_eval = {k: v for k, v in json.loads((trained / "eval.json").read_text()).items() if k != "step"}
    assert ours_eval == pytest.approx(train_eval, abs=1e-6)


def test_eval_verb_on_the_run_gives_the_trainers_numbers(trained, tmp_path):
    """`eval --checkpoint RUN` with no --val: the task of the run's config, on the run's data.val and classes."""
    proc = run_pipeline("eval", "--checkpoint", trained, "--out", tmp_path / "eval.json")
    assert "eval: " in proc.stdout and "zero-shot top-1" in proc.stdout
    train_eval = {k: v for k, v in json.loads((trained / "eval.json").read_text()).items() if k != "step"}
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(train_eval, abs=1e-6)


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_stage_checkpoints_export(demo_data, tmp_path, stage):
    out = tmp_path / "run"
    _train(demo_data, out, **{"train.zero_stage": stage, "train.steps": 2, "train.ckpt_every": 1,
                              "train.keep_last": 1, "train.grad_accum": 2, "train.eval_at_end": "false"})
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000002"]  # keep_last=1
    assert read_metrics(out / "metrics.jsonl")[-1]["samples_seen"] == 2 * 2 * 2 * 16  # steps x accum x ranks x batch
    ckpt = out / "checkpoints" / "step_00000002"
    state = consolidated_state_dict(ckpt)
    model, *_ = create_clip("clip-tiny")
    assert set(state) == set(model.state_dict())
    run_pipeline("export", "--checkpoint", ckpt, "--out", tmp_path / "export")
    exported, *_ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, state[k].reshape(v.shape), rtol=0, atol=0)


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


RESUME_EXTRA = {"train.steps": 8, "train.ckpt_every": 4, "train.eval_at_end": "false", "train.resume": "auto",
                "data.log_sample_keys": "true"}


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    """An 8-step run that the interrupted ones below must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(demo_data, out, **RESUME_EXTRA)
    return out


def _start_training(demo_data, out, **extra):
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(DEMO_CONFIG), "--nproc-per-node", "2",
           *train_overrides(demo_data, out, **extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_step(proc, out, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {step}")


def test_sigkill_then_resume_matches_uninterrupted_run(demo_data, tmp_path, uninterrupted):
    reference = _losses(uninterrupted)
    out = tmp_path / "b"
    proc = _start_training(demo_data, out, **RESUME_EXTRA)
    _wait_for_step(proc, out, 5)  # kill after the step-4 checkpoint, mid-way to the next one
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000008").exists()
    (out / "checkpoints" / "step_00000006.partial").mkdir()  # as if killed while writing a checkpoint

    _train(demo_data, out, **RESUME_EXTRA)
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    assert not (out / "checkpoints" / "step_00000006.partial").exists()
    for rank in (0, 1):  # the sample keys of every step, before and after the resume, equal the reference's
        assert _sample_keys(out, rank) == _sample_keys(uninterrupted, rank)
        assert sorted(_sample_keys(out, rank)) == list(range(1, 9))


def test_sigterm_to_one_rank_checkpoints_exits_for_requeue_and_resumes(demo_data, tmp_path, uninterrupted):
    import psutil

    reference = _losses(uninterrupted)
    out = tmp_path / "p"
    proc = _start_training(demo_data, out, **{**RESUME_EXTRA, "train.ckpt_every": 100})
    _wait_for_step(proc, out, 2)
    processes = psutil.Process(proc.pid).children(recursive=True)
    ranks = {p.environ()["RANK"]: p for p in processes if "RANK" in p.environ() and p.name() != "pt_data_worker"}
    assert set(ranks) == {"0", "1"}
    for p in processes:  # as a scheduler's notice reaching every process of one rank, its loader workers too
        if p.environ().get("RANK") == "1":
            p.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 75  # EX_TEMPFAIL: the sbatch scripts requeue on it
    stopped_at = int((out / "PREEMPTED").read_text())
    assert 2 <= stopped_at < 8
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values())

    _train(demo_data, out, **RESUME_EXTRA)  # the requeued job
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 9)) and not (out / "PREEMPTED").exists()
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    assert _sample_keys(out, 0) == _sample_keys(uninterrupted, 0)


def _sample_keys(out, rank):
    lines = (out / "sample_keys" / f"rank_{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


def test_siglip_run_on_a_ring_exports_logit_bias(demo_data, tmp_path):
    out = tmp_path / "run"
    run_pipeline("train", "--config", REPO / "configs" / "siglip" / "tiny_demo.yaml", "--nproc-per-node", "2",
                 *train_overrides(demo_data, out, **{"train.steps": 3, "train.eval_at_end": "false"}))
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["logit_scale"] == pytest.approx(10.0, rel=0.05)  # t' starts at log 10
    assert records[0]["logit_bias"] == pytest.approx(-10.0, abs=0.05)
    assert all(0 < r["loss"] < 20 for r in records)
    run_pipeline("export", "--checkpoint", out, "--out", tmp_path / "export")
    model, *_ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    state = consolidated_state_dict(out / "checkpoints" / "step_00000003")
    assert model.logit_bias is not None
    torch.testing.assert_close(model.logit_bias.detach(), state["logit_bias"].reshape(()), rtol=0, atol=0)
    torch.testing.assert_close(model.logit_scale.detach(), state["logit_scale"].reshape(()), rtol=0, atol=0)


@pytest.mark.slow
def test_pipe_stream_trains_on_the_local_runs_samples(demo_data, tmp_path, uninterrupted):
    """data.train as `pipe:` commands, streamed through the run's cache: every step's sample keys on every rank
    equal the local run's (the cache bound itself: tests/data/test_streaming.py)."""
    out, cache = tmp_path / "piped", tmp_path / "cache"
    _train(demo_data, out, **{**RESUME_EXTRA, "data.train": f"pipe:cat {demo_data['train']}",
                              "data.cache_dir": cache, "data.pipe_prefetch": 2})
    for rank in (0, 1):
        assert _sample_keys(out, rank) == _sample_keys(uninterrupted, rank)
    assert len(list(cache.glob("*.index.parquet"))) == len(expand_shards(demo_data["train"]))
