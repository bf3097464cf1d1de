"""`train` as an attacker or an unlucky user would run it. Threat model: configs with values out of range, an
out_dir that is a file or already holds another run, a `latest` that names another run, files planted in the
checkpoint being resumed, a learning rate that makes the run diverge. Expected: one `error:` line and exit code
2 before any harm; another run's checkpoints and metrics are never deleted unless `train.overwrite=true`; the
new run's own checkpoint is never pruned; no code from a checkpoint runs; a diverged run stops without writing
a checkpoint. Real runs here are one-rank (in-process DeepSpeed); the 2-rank paths are in tests/train/."""
import json
import shutil

import pytest

from conftest import DEMO_CONFIG, run_pipeline, train_overrides
from pipeline.__main__ import main
from pipeline.export import consolidated_state_dict
from pipeline.train.metrics import read_metrics

from .checkpoint_forgery import plant_pickle, write_checkpoint


def _train(demo_data, out, **extra):
    return run_pipeline("train", "--config", DEMO_CONFIG, *train_overrides(demo_data, out, **extra), check=False)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=0", "train.lr"),
    ("train.seed=-1", "train.seed"), ("loss.logit_scale_max=0", "loss.logit_scale_max"),
    ("train.eps=nan", "train.eps"), ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
])
def test_config_values_out_of_range_are_one_line(capsys, tmp_path, override, key):
    # data.train names nothing: a value that slipped through would fail later, on the data, naming another key
    rc = main(["train", "--config", str(DEMO_CONFIG), f"data.train={tmp_path}/none.tar",
               f"train.out_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {key}=") and "must be" in err[0], err


def test_out_dir_that_is_a_file_is_one_line(demo_data, tmp_path):
    target = tmp_path / "run"
    target.write_text("keep me")
    assert "train.out_dir" in _one_error_line(_train(demo_data, target, **{"train.resume": "none"}))
    assert target.read_text() == "keep me"


def _another_run(out):
    write_checkpoint(out, step=8)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 9)))


def test_a_fresh_run_refuses_an_out_dir_holding_another_run(demo_data, tmp_path):
    out = tmp_path / "run"
    _another_run(out)
    before = _tree(out)
    error = _one_error_line(_train(demo_data, out, **{"train.resume": "none"}))
    assert "another run's" in error and "step_00000008" in error and "train.overwrite" in error
    assert _tree(out) == before


@pytest.mark.parametrize("name", ["{other}/checkpoints/step_00000001", "../../other/checkpoints/step_00000001"])
def test_latest_naming_another_run_is_not_resumed(demo_data, tmp_path, name):
    other = tmp_path / "other"
    write_checkpoint(other)
    out = tmp_path / "run"
    write_checkpoint(out, step=2)
    (out / "checkpoints" / "latest").write_text(name.format(other=other))
    error = _one_error_line(_train(demo_data, out, **{"train.resume": "auto"}))
    assert "latest" in error and "not a checkpoint of this run" in error


@pytest.fixture(scope="module")
def overwritten(demo_data, tmp_path_factory):
    """A one-rank run with train.overwrite=true in an out_dir that held another run's step 8."""
    out = tmp_path_factory.mktemp("overwritten") / "run"
    _another_run(out)
    proc = _train(demo_data, out, **{"train.resume": "none", "train.overwrite": "true", "train.steps": 4,
                                     "train.ckpt_every": 2, "train.keep_last": 3, "train.eval_at_end": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_overwrite_replaces_the_other_runs_checkpoints_and_metrics(overwritten):
    out, proc = overwritten
    assert "removing the previous run's checkpoints and metrics" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resuming_an_earlier_step_keeps_its_new_checkpoint_and_says_what_metrics_it_drops(overwritten, demo_data,
                                                                                        tmp_path):
    out = tmp_path / "run"
    shutil.copytree(overwritten[0], out)
    proc = _train(demo_data, out, **{"train.resume": out / "checkpoints" / "step_00000002", "train.steps": 3,
                                     "train.ckpt_every": 1, "train.keep_last": 1, "train.eval_at_end": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step_00000003").is_dir()  # a higher, older step never pushes it out
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert "2 records after step 2 dropped" in proc.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("planted", ["rank_00000.pt", "mp_rank_00_model_states.pt"])
def test_a_planted_pickle_does_not_run_at_resume(overwritten, demo_data, tmp_path, planted):
    out = tmp_path / "run"
    shutil.copytree(overwritten[0], out)
    marker = tmp_path / "code_ran"
    plant_pickle(out / "checkpoints" / "step_00000004" / planted, marker)
    proc = _train(demo_data, out, **{"train.resume": "auto", "train.steps": 6})
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    error = _one_error_line(proc)
    assert planted in error and "refused" in error


def test_a_diverging_run_stops_in_one_line_and_writes_no_checkpoint_after_it(demo_data, tmp_path):
    out = tmp_path / "run"
    proc = _train(demo_data, out, **{"train.lr": 1e30, "train.steps": 8, "train.ckpt_every": 1,
                                     "train.max_nonfinite_steps": 2, "train.resume": "none"})
    error = _one_error_line(proc)
    records = read_metrics(out / "metrics.jsonl")
    bad = [r["step"] for r in records if r["nonfinite_steps"]]
    assert bad and f"step {bad[0] + 1}:" in error and "train.max_nonfinite_steps=2" in error
    assert records[-1]["step"] == bad[0] + 1 < 8  # stopped at the log step where the limit was reached
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert steps and max(steps) < bad[0] + 1  # no checkpoint once the run was known to have diverged
    consolidated_state_dict(out / "checkpoints" / f"step_{max(steps):08d}")  # raises on non-finite weights


def test_a_planted_pickle_in_the_universal_copy_is_refused_before_deepspeed_reads_it(tmp_path):
    """Resuming on another number of ranks makes DeepSpeed read `universal/` (weights_only=False): every `.pt` in
    the checkpoint tree is checked first, not only the top-level files."""
    from pipeline.train.checkpoint import CheckpointError, vet_checkpoint

    ckpt = write_checkpoint(tmp_path / "run")
    vet_checkpoint(ckpt)  # the untouched checkpoint passes
    planted = ckpt / "universal" / "zero" / "visual.conv1.weight" / "fp32.pt"
    planted.parent.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    plant_pickle(planted, marker)
    with pytest.raises(CheckpointError, match="fp32.pt: refused"):
        vet_checkpoint(ckpt)
    assert not marker.exists()
