"""Starting ranks: `--nproc-per-node` of the train and demo verbs. Threat model: a count that makes no sense
(0, negative) must not silently become one rank. Expected: one `error:` line, exit code 2, nothing written."""
import pytest

from conftest import DEMO_CONFIG, run_pipeline, train_overrides


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_train_refuses_a_rank_count_below_one(demo_data, tmp_path, nproc):
    proc = run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", nproc,
                        *train_overrides(demo_data, tmp_path / "run", **{"train.steps": 1}), check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--nproc-per-node must be >= 1" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_rank_count_below_one(tmp_path):
    proc = run_pipeline("demo", "--out", tmp_path / "demo", "--nproc-per-node", "0", "--steps", "1",
                        "--train-samples", "64", check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--nproc-per-node must be >= 1" in errors[0], proc.stderr
    assert not (tmp_path / "demo").exists()
