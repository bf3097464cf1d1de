"""`eval --model` on checkpoint directories someone else may have written to. Threat model: planted pickles in
any checkpoint file, a `latest` naming another run, weights that are not finite, another task's checkpoint.
Expected: no code from the checkpoint runs, and each refusal is one `error:` line with exit code 2."""
import pytest
import yaml

from pipeline.__main__ import main

from .checkpoint_forgery import clip_state, plant_pickle, write_checkpoint


def _eval(capsys, model, demo_data) -> tuple[int, list[str]]:
    rc = main(["eval", "--model", str(model), "--val", demo_data["val"], "--batch-size", "16"])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("planted", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_does_not_run_at_eval(tmp_path, capsys, demo_data, planted):
    ckpt = write_checkpoint(tmp_path / "run")
    marker = tmp_path / "code_ran"
    plant_pickle(ckpt / planted, marker)
    rc, err = _eval(capsys, tmp_path / "run", demo_data)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert rc == 2 and len(err) == 1 and planted in err[0], err


def test_latest_naming_an_absolute_path_is_refused(tmp_path, capsys, demo_data):
    other = write_checkpoint(tmp_path / "other")
    write_checkpoint(tmp_path / "mine", step=2)
    (tmp_path / "mine" / "checkpoints" / "latest").write_text(str(other))
    rc, err = _eval(capsys, tmp_path / "mine", demo_data)
    assert rc == 2 and len(err) == 1 and "not a checkpoint of this run" in err[0], err


def test_non_finite_weights_are_refused(tmp_path, capsys, demo_data):
    rc, err = _eval(capsys, write_checkpoint(tmp_path / "finite"), demo_data)
    assert rc == 0, err  # the hand-made checkpoint is one eval accepts; the refusals here depart from it
    state = clip_state()
    state["logit_scale"].fill_(float("inf"))
    write_checkpoint(tmp_path / "run", state=state)
    rc, err = _eval(capsys, tmp_path / "run", demo_data)
    assert rc == 2 and len(err) == 1 and "non-finite weights" in err[0] and "logit_scale" in err[0], err


def test_another_tasks_checkpoint_is_one_line(tmp_path, capsys, demo_data):
    ckpt = write_checkpoint(tmp_path / "run")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["task"], cfg["model"]["name"] = "supervised", "demo_vit"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = _eval(capsys, ckpt, demo_data)
    assert rc == 2 and len(err) == 1 and "supervised" in err[0], err


def test_a_run_without_held_out_data_is_one_line_naming_the_key(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["data"]["val"] = ""
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["eval", "--checkpoint", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no data.val" in err[0] and "--val" in err[0], err


def test_an_unknown_task_in_a_checkpoint_is_one_line(tmp_path, capsys, demo_data):
    ckpt = write_checkpoint(tmp_path / "run")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["task"] = "no_such_task"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = _eval(capsys, ckpt, demo_data)
    assert rc == 2 and len(err) == 1 and "no_such_task" in err[0] and "clip" in err[0], err
