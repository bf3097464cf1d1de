"""The binding loss when a rank's micro-batch lacks a modality: 2 ranks (torchrun, gloo, DeepSpeed ZeRO-1) give
the loss and the encoder gradients that one process computes on the whole global batch."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO


def clean_env() -> dict:
    """This environment without a launcher's variables, running this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and
           not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run(nproc: int, out, tmp_path) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), str(REPO / "tests" / "tasks" / "binding_ranks.py"), str(out), "1"],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang is the failure this test looks for: take the ranks down too
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{nproc} ranks hung:\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return json.loads(stdout.split("REPORT ")[-1].splitlines()[0])


@pytest.mark.slow  # ~20 s on an idle 2-core machine, 75 s on a shared one
def test_rank_without_a_modality_matches_one_process(tmp_path):
    two = _run(2, tmp_path / "two.pt", tmp_path)
    one = _run(1, tmp_path / "one.pt", tmp_path)
    assert two["local_depth"] == 0 and one["local_depth"] == 3  # rank 0 of 2 had no depth sample
    assert (two["samples/audio"], two["samples/depth"], two["samples/thermal"]) == (6, 3, 0)
    assert "loss/thermal" not in two  # carried by no sample: not part of the loss
    for key in ("loss", "loss/audio", "loss/depth"):
        assert abs(two[key] - one[key]) < 1e-5, (key, two[key], one[key])
    g2, g1 = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert set(g2) == set(g1) and any(k.startswith("encoders.depth.") for k in g2)
    for name in g1:
        assert torch.allclose(g2[name], g1[name], atol=1e-6, rtol=1e-4), name
        if name.startswith("encoders.thermal."):
            assert not g1[name].any()
        elif name.startswith("encoders.depth.blocks.0.mlp.0.weight"):
            assert g1[name].abs().max() > 1e-4  # a real gradient reached the encoder rank 0 had no input for
