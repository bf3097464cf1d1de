"""Rank / world / rendezvous from every launcher's environment, Slurm node lists, the collective timeout."""
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.train.distributed import (DistEnv, collective_timeout, expand_nodelist, first_host, read_dist_env,
                                        slurm_master_port)


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("dgx-h100-[5]", ["dgx-h100-5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "n[1-2", "n1]", "n[a-b]", "n[3-1]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slurm_port_is_a_function_of_the_job_id():
    assert slurm_master_port("4242") == slurm_master_port(4242) == 15000 + 4242
    assert slurm_master_port(15000 + 7) == 15007
    assert all(15000 <= slurm_master_port(j) < 30000 for j in range(0, 100000, 997))


def test_plain_python_is_a_world_of_one():
    assert read_dist_env({}) == DistEnv(0, 1, 0, False)
    # inside an allocation of one task (salloc shell, single-task sbatch): still a world of one
    assert read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}).launched is False


def test_torchrun_environment():
    env = read_dist_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                         "MASTER_ADDR": "node07", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x",
                         "GROUP_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})  # torchrun under srun
    assert env == DistEnv(5, 16, 1, True, "torchrun", "node07", 29400)


def test_deepspeed_launcher_environment():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "CROSS_SIZE": "2",
                         "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert env == DistEnv(3, 4, 1, True, "deepspeed", "10.0.0.1", 29500)


def test_accelerate_environment():
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert env.launcher == "accelerate" and (env.rank, env.world_size, env.local_rank) == (1, 2, 1)


def test_srun_environment_derives_master_from_the_node_list_and_job_id():
    e = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "gpu[017-020,031]"}
    assert read_dist_env(e) == DistEnv(9, 16, 1, True, "slurm", "gpu017", 15000 + 123456 % 15000)
    # the step's node list (a step on part of the allocation) wins over the job's; MASTER_* win over both
    assert read_dist_env({**e, "SLURM_STEP_NODELIST": "gpu[019-020]"}).master_addr == "gpu019"
    env = read_dist_env({**e, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("head", 1234)


def test_srun_task_bound_to_one_gpu_uses_it():
    e = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "1",
         "SLURM_JOB_NODELIST": "n1"}
    assert read_dist_env({**e, "CUDA_VISIBLE_DEVICES": "5"}).local_rank == 0
    assert read_dist_env({**e, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}).local_rank == 5
    assert read_dist_env(e).local_rank == 5


def test_srun_without_node_list_or_job_id_says_what_to_set():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


def test_collective_timeout():
    assert collective_timeout({}) == timedelta(minutes=10)
    assert collective_timeout({"PIPELINE_DIST_TIMEOUT": "45"}) == timedelta(seconds=45)
    assert collective_timeout({"DEEPSPEED_TIMEOUT": "3"}) == timedelta(minutes=3)
    assert collective_timeout({"PIPELINE_DIST_TIMEOUT": "7.5", "DEEPSPEED_TIMEOUT": "3"}) == timedelta(seconds=7.5)
    with pytest.raises(ValueError):
        collective_timeout({"PIPELINE_DIST_TIMEOUT": "0"})


def test_train_verb_accepts_the_deepspeed_launchers_local_rank():
    from pipeline.__main__ import build_parser

    parser = build_parser()
    for argv in (["--local_rank=1", "train", "--config", "c.yaml", "a=1"],  # deepspeed --module pipeline ...
                 ["train", "--config", "c.yaml", "a=1", "--local_rank=1"]):  # a script-style launcher appends it
        args = parser.parse_args(argv)
        assert (args.verb, args.config, args.overrides) == ("train", "c.yaml", ["a=1"])


def test_torchrun_restart_count(monkeypatch):
    from pipeline.train.distributed import _torchrun_restart

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert _torchrun_restart() == 0  # not the agent's store: nothing to work around
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert _torchrun_restart() == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _torchrun_restart() == 0


GROUP_TIMEOUTS = """
import torch, torch.distributed as dist
from deepspeed.utils import groups
from pipeline.train.distributed import init_process_group, read_dist_env
init_process_group(read_dist_env(), "gloo")
for name, group in (("world", dist.group.WORLD), ("deepspeed", groups._clone_world_group()),
                    ("new_group", dist.new_group([0]))):
    print(name, group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


def test_every_process_group_gets_the_collective_timeout():
    """DeepSpeed creates its groups (the one its gradient all-reduce runs in) without a timeout: they must get
    PIPELINE_DIST_TIMEOUT too, not torch's built-in 30 minutes, or a hung peer holds the others there."""

    from conftest import REPO
    from pipeline.train.distributed import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PIPELINE_DIST_TIMEOUT="7", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", GROUP_TIMEOUTS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timeouts = dict(line.split() for line in proc.stdout.splitlines() if line.split()[0] in
                    ("world", "deepspeed", "new_group"))
    assert timeouts == {"world": "7.0", "deepspeed": "7.0", "new_group": "7.0"}, proc.stdout


EXTENSIONS = """
import os
import subprocess
from pipeline.train.distributed import init_process_group, read_dist_env
init_process_group(read_dist_env(), "gloo")
print("extensions", os.environ["TORCH_EXTENSIONS_DIR"])
"""


def test_deepspeed_ops_build_in_a_directory_of_this_environment():
    """DeepSpeed compiles its CPU shared-memory op when it starts; in torch's per-user default directory two
    Python environments used at once rebuilt it in turn behind one lock (test runs stalled for minutes)."""

    from conftest import REPO
    from pipeline.train.distributed import extensions_dir, free_port

    assert extensions_dir("/venv/a") != extensions_dir("/venv/b")
    assert extensions_dir("/venv/a") == extensions_dir("/venv/a")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCH_EXTENSIONS_DIR"))}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    def extensions(env):
        proc = subprocess.run([sys.executable, "-c", EXTENSIONS], cwd=REPO, env={**env, "MASTER_PORT": str(free_port())},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("extensions"))

    assert extensions(base) == extensions_dir(sys.prefix)
    import deepspeed.ops

    if deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):  # DeepSpeed builds it where the CPU allows
        assert any(Path(extensions_dir(sys.prefix)).glob("deepspeed_shm_comm*/*.so"))


def test_nccl_ranks_abort_on_a_timed_out_collective(monkeypatch):
    """For NCCL, the timeout is torch's default for new groups and the watchdog tears a rank down when a
    collective exceeds it (TORCH_NCCL_ASYNC_ERROR_HANDLING=3), unless the user chose otherwise. NCCL itself
    is not started here: DeepSpeed's init is replaced by a recorder."""
    import types

    from torch.distributed import distributed_c10d as c10d

    from pipeline.train.distributed import init_process_group

    if c10d.default_pg_nccl_timeout is None:
        pytest.skip("torch built without NCCL")
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)  # restored after the test
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    calls = []
    fake_deepspeed = types.SimpleNamespace(init_distributed=lambda **kw: calls.append((kw, dict(os.environ))))
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed)
    for preset, expected in (({}, "3"), ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "1")):
        monkeypatch.setattr(os, "environ", {"PIPELINE_DIST_TIMEOUT": "9", **preset})
        init_process_group(DistEnv(0, 1, 0, False), "nccl")
        kwargs, environ = calls.pop()
        assert kwargs["timeout"] == timedelta(seconds=9) and kwargs["dist_backend"] == "nccl"
        assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == expected
        assert c10d._get_default_timeout("nccl") == c10d._get_default_timeout("gloo") == timedelta(seconds=9)


_GATHER_AND_LEAVE = """
import torch, torch.distributed as dist
from pipeline.train.distributed import close_process_group
dist.init_process_group("gloo")
out = [torch.zeros(1000) for _ in range(dist.get_world_size())]
for _ in range(20):
    dist.all_gather(out, torch.randn(1000))
close_process_group(barrier=BARRIER)
"""


@pytest.mark.parametrize("barrier", [True, False], ids=["done", "error_exit"])
def test_ranks_that_close_their_group_never_abort_at_exit(tmp_path, barrier):
    """A 2-rank gloo job that exits with its group alive aborted at interpreter shutdown in about one run of three
    on a 2-core machine ("terminate called without an active exception", SIGABRT after the work was done: an
    eval run failed that way in CI). Leaving through `close_process_group`, as every verb does, 12 runs in a row
    exit 0 (chance that 12 runs of the old way all pass: about 1 in 130). Without the barrier too: the way a rank
    leaves after a one-line error (a checkpoint refused at resume exited -6 instead of 2 that way)."""
    script = tmp_path / "gather_and_leave.py"
    script.write_text(_GATHER_AND_LEAVE.replace("BARRIER", str(barrier)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for attempt in range(12):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"attempt {attempt}: {proc.stderr[-2000:]}"
