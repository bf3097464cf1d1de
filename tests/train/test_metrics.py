"""train.report_to sinks (pipeline/train/metrics.py): what each writes, read back by the tool that reads it."""
import importlib.util

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train.metrics import MetricsLog, format_log_line, read_metrics


def _record(step):
    return {"step": step, "loss": 5.0 - step, "lr": 1e-3 * step, "samples_per_s": 100.0 + step,
            "step_time_ms": 500.0, "data_wait_frac": 0.25, "epoch": 0, "flag": True, "note": "x"}


def _run(out, start_step, steps, report_to, **kwargs):
    log = MetricsLog(out, 10, start_step, True, report_to, **kwargs)
    for step in steps:
        log.log(_record(step))
        log.advance()
    log.log_eval(steps[-1], {"samples": 80, "zero_shot_top1": 0.5})
    log.close()


def test_jsonl_and_tensorboard_sinks_are_read_back_and_resume_truncates(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, 0, [1, 2, 3, 4], ["jsonl", "tensorboard"])
    _run(tmp_path, 2, [3, 4, 5], ["jsonl", "tensorboard"])  # resumed from a step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path / "eval.jsonl") == [{"step": 5, "samples": 80, "zero_shot_top1": 0.5}]
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "samples_per_s", "eval/zero_shot_top1", "eval/samples"} <= set(events.Tags()["scalars"])
    assert "flag" not in events.Tags()["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("eval/zero_shot_top1")][-1] == (5, 0.5)
    # pytest's stderr is not a terminal: no bar, one plain line per logged step
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 7 and lines[-1] == format_log_line(_record(5), 10)
    assert lines[-1] == "step 5/10 | loss 0.0000 | lr 5.00e-03 | 105.0 samples/s | data-wait 25.0% | ETA 0:00:02"


def test_only_the_chosen_sinks_write(tmp_path):
    _run(tmp_path, 0, [1, 2], ["tensorboard"])
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / "tensorboard").is_dir()
    (tmp_path / "none").mkdir()
    _run(tmp_path / "none", 0, [1], [])
    assert list((tmp_path / "none").iterdir()) == []


def test_report_to_is_validated():
    with pytest.raises(ConfigError, match=r"train.report_to: 'mlflow' is not valid; choose any of jsonl, "):
        load_config(None, ["train.report_to=[jsonl, mlflow]"])
    with pytest.raises(ConfigError, match=r"eval.every=-1 must be >= 0"):
        load_config(None, ["eval.every=-1"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"^train.report_to: wandb is not installed \(pip install wandb\)"):
            load_config(None, ["train.report_to=[wandb]"])
    else:
        assert load_config(None, ["train.report_to=[wandb]"]).train.report_to == ["wandb"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, 0, [1, 2], ["wandb"], config={"train": {"steps": 10}})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    _run(tmp_path, 2, [3], ["wandb"])
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)
