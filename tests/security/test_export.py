"""`export` as an attacker or an unlucky user would call it. Threat model: `--out` may name anything (the run
directory, someone's data, a file); the checkpoint directory may hold files planted by someone else (a pickle
that runs code when unpickled, a `latest` naming another run, non-finite weights, another task's config).
Expected: nothing that is not a complete export of ours is ever deleted or replaced, nothing in a checkpoint runs,
and each refusal is one `error:` line with exit code 2."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.__main__ import main

from .checkpoint_forgery import clip_state, plant_pickle, write_checkpoint


def _export(capsys, checkpoint, out) -> tuple[int, list[str]]:
    rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    return rc, capsys.readouterr().err.strip().splitlines()


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run, step=1)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (run / "config.yaml").write_text("train: {}\n")
    return run


def test_out_is_the_run_directory_is_refused_and_nothing_deleted(run_dir, capsys):
    before = _tree(run_dir)
    rc, err = _export(capsys, run_dir, run_dir)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --out:"), err
    assert _tree(run_dir) == before


def test_out_is_a_checkpoints_folder_or_a_foreign_directory_is_refused(run_dir, tmp_path, capsys):
    data = tmp_path / "my_data"
    data.mkdir()
    (data / "precious.txt").write_text("not an export")
    for out, why in ((run_dir / "checkpoints", "holds the checkpoint being exported"),
                     (data, "not an export this tool wrote")):
        before = _tree(out)
        rc, err = _export(capsys, run_dir, out)
        assert rc == 2 and len(err) == 1 and why in err[0], err
        assert _tree(out) == before


def test_out_is_an_existing_file_is_one_line(run_dir, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    rc, err = _export(capsys, run_dir, target)
    assert rc == 2 and len(err) == 1 and "is not a directory" in err[0], err
    assert target.read_bytes() == b"keep me"


def test_a_previous_export_is_replaced_but_not_once_something_else_was_added(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    (tmp_path / "export.partial").mkdir()  # a name the old code used as its scratch directory (and deleted)
    (tmp_path / "export.partial" / "notes.txt").write_text("mine")
    from pipeline.export_target import MARKER

    assert _export(capsys, run_dir, out)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["entries"]) == {"open_clip_config.json", "open_clip_model.safetensors"}
    expected = clip_state()
    exported = load_file(out / "open_clip_model.safetensors")
    torch.testing.assert_close(exported["text_projection"], expected["text_projection"], rtol=0, atol=0)

    assert _export(capsys, run_dir, out)[0] == 0  # ours and complete: replaced
    (out / "my_eval.json").write_text("{}")  # now it holds something the export did not write
    rc, err = _export(capsys, run_dir, out)
    assert rc == 2 and len(err) == 1, err
    assert (out / "my_eval.json").read_text() == "{}" and (out / "open_clip_model.safetensors").is_file()
    assert (tmp_path / "export.partial" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no scratch left behind


@pytest.mark.parametrize("planted", ["mp_rank_00_model_states.pt", "rank_00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_does_not_run_at_export(tmp_path, capsys, planted):
    ckpt = write_checkpoint(tmp_path / "run")
    marker = tmp_path / "code_ran"
    plant_pickle(ckpt / planted, marker)
    rc, err = _export(capsys, ckpt, tmp_path / "export")
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert rc == 2 and len(err) == 1 and planted in err[0] and "refused" in err[0], err
    assert not (tmp_path / "export").exists()


def test_a_raw_pickle_in_place_of_a_torch_file_does_not_run(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run")
    marker = tmp_path / "code_ran"
    plant_pickle(ckpt / "mp_rank_00_model_states.pt", marker, as_torch_file=False)
    rc, err = _export(capsys, ckpt, tmp_path / "export")
    assert not marker.exists() and rc == 2 and len(err) == 1, err


@pytest.mark.parametrize("name", ["/{other}/checkpoints/step_00000001", "../../{other_name}/checkpoints/step_00000001"])
def test_latest_naming_another_run_is_refused(tmp_path, capsys, name):
    other = tmp_path / "other"
    write_checkpoint(other)
    mine = tmp_path / "mine"
    write_checkpoint(mine, step=2)
    (mine / "checkpoints" / "latest").write_text(name.format(other=str(other).lstrip("/"), other_name="other"))
    rc, err = _export(capsys, mine, tmp_path / "export")
    assert rc == 2 and len(err) == 1 and "latest" in err[0] and "not a checkpoint of this run" in err[0], err
    assert not (tmp_path / "export").exists()


def test_non_finite_weights_are_not_exported(tmp_path, capsys):
    state = clip_state()
    state["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    ckpt = write_checkpoint(tmp_path / "run", state=state)
    rc, err = _export(capsys, ckpt, tmp_path / "export")
    assert rc == 2 and len(err) == 1 and "non-finite weights" in err[0] and "visual.conv1.weight" in err[0], err
    assert not (tmp_path / "export").exists()


def test_a_checkpoint_whose_config_names_another_task_is_one_line(tmp_path, capsys):
    import yaml

    ckpt = write_checkpoint(tmp_path / "run")
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["task"], cfg["model"]["name"] = "supervised", "demo_vit"  # CLIP weights, a ViT classifier's config
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, err = _export(capsys, ckpt, tmp_path / "export")
    assert rc == 2 and len(err) == 1 and "do not fit the model its config names" in err[0], err
    assert not (tmp_path / "export").exists()
