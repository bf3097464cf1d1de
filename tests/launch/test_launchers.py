"""Real CPU jobs (gloo) under each launcher: srun-style tasks, torchrun with two agents and c10d, accelerate
launch, the DeepSpeed launcher; a rank killed mid-run; a 2-rank ZeRO-2 checkpoint resumed on 1 rank; preemption
through launch/torchrun.sh; torchrun --max-restarts with train.resume=auto."""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, REPO, train_overrides
from launch_helpers import (PY, Job, alive, clean_env, fake_slurm_bin, free_slurm_job_id, last_step,
                            rank_processes, srun_task_env, wait_for)
from pipeline.train.checkpoint import checkpoint_meta, checkpoint_world_size
from pipeline.train.distributed import free_port
from pipeline.train.metrics import read_metrics

TRAIN = ["-m", "pipeline", "train", "--config", DEMO_CONFIG]
QUICK = {"train.eval_at_end": "false", "train.resume": "none"}

LOADER_EXIT_HANG = ("a rank did not exit: the loop must shut its DataLoader workers down on every path (they "
                    "ignore SIGTERM, so multiprocessing's atexit terminate() + join would wait forever)")


def _overrides(demo_data, out, **extra):
    return train_overrides(demo_data, out, **{**QUICK, **extra})


def _steps(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path / "logs")
    yield j
    j.kill()


def _check_run(out, steps, world):
    assert _steps(out) == list(range(1, steps + 1))
    ckpt = out / "checkpoints" / f"step_{steps:08d}"
    assert (out / "checkpoints" / "latest").read_text() == ckpt.name
    assert checkpoint_world_size(ckpt) == world
    return ckpt


@pytest.fixture(scope="module")
def srun_zero2_run(demo_data, tmp_path_factory):
    """Two tasks as `srun python -m pipeline train` starts them (SLURM_PROCID / NTASKS / LOCALID, node list, job
    id; no RANK, no MASTER_*, no torchrun), ZeRO-2, 3 steps, checkpoint at step 3."""
    base = tmp_path_factory.mktemp("srun")
    out, j = base / "run", Job(base / "logs")
    job_id = free_slurm_job_id()
    hung = []
    try:
        for rank in range(2):
            j.start([PY, *TRAIN, *_overrides(demo_data, out, **{"train.steps": 3, "train.zero_stage": 2})],
                    srun_task_env(rank, 2, job_id), f"task{rank}")
        done = lambda: (out / "checkpoints" / "latest").is_file() and last_step(out) == 3  # noqa: E731
        wait_for(lambda: done() or all(p.poll() is not None for p in j.procs), 400, "the step-3 checkpoint")
        try:
            rcs = j.wait(30)  # a finished rank normally exits within seconds
        except AssertionError:
            if not done():
                raise
            hung = [n for n, p in zip(j.names, j.procs) if p.returncode in (None, -9)]
            rcs = [0, 0]
    finally:
        j.kill()
    assert rcs == [0, 0], j.logs()
    return {"out": out, "logs": j, "hung": hung}


def test_srun_tasks_train_and_checkpoint(srun_zero2_run):
    out = srun_zero2_run["out"]
    ckpt = _check_run(out, 3, 2)
    assert checkpoint_meta(ckpt)["zero_stage"] == 2
    names = {p.name for p in ckpt.iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt", "config.yaml", "meta.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert read_metrics(out / "metrics.jsonl")[-1]["samples_seen"] == 3 * 2 * 16
    assert not srun_zero2_run["hung"], f"{srun_zero2_run['hung']} did not exit after finishing: {LOADER_EXIT_HANG}"


def test_two_rank_zero2_checkpoint_resumes_on_one_rank(srun_zero2_run, job, tmp_path):
    """load_checkpoint on a 1-rank engine: converted to DeepSpeed's universal format, weights and Adam moments
    restored exactly, the writer's client state returned, and training goes on."""
    src = srun_zero2_run["out"] / "checkpoints" / "step_00000003"
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(src, ckpt)
    job.start([PY, REPO / "tests" / "launch" / "resume_one_rank.py", ckpt], clean_env(), "resume")
    assert job.wait(300) == [0], job.logs()
    report = json.loads(job.log("resume").split("REPORT ")[-1])
    assert (report["world_size"], report["saved_world_size"], report["state_world_size"]) == (1, 2, 2)
    assert report["step"] == 3 and {"step", "world_size", "batch_size", "samples_seen"} <= set(report["keys"])
    assert report["param_diff"] == 0.0
    assert report["moment_diff"] == 0.0 and report["moment_max"] > 0  # Adam moments restored, not fresh zeros
    assert report["optimizer_steps"] == [3.0] and report["global_steps_after"] == 5
    assert 0 < report["loss"] < 20 and report["changed"] == report["params"]
    assert (ckpt / "universal" / "zero").is_dir() and not (ckpt / "universal.partial").exists()
    assert not (ckpt / "latest_universal").exists()


@pytest.mark.slow
def test_trainer_resumes_a_two_rank_checkpoint_on_one_rank(srun_zero2_run, demo_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(srun_zero2_run["out"] / "checkpoints", out / "checkpoints")
    j = Job(tmp_path / "logs")
    try:
        j.start([PY, *TRAIN, *_overrides(demo_data, out, **{"train.steps": 5, "train.zero_stage": 2,
                                                            "train.global_batch_size": 32, "train.resume": "auto"})],
                clean_env(), "one")
        assert j.wait(400) == [0], j.logs()
    finally:
        j.kill()
    assert "resumed from" in j.log("one")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [4, 5]


def _exits_in_time(main, job, seconds: float, name: str) -> None:
    """Waits for `main`; a rank still there after `seconds` fails the test (see LOADER_EXIT_HANG)."""
    try:
        main.wait(seconds)
    except Exception:
        pytest.fail(f"{LOADER_EXIT_HANG}\n{job.log(name, 1500)}")


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("srun", marks=pytest.mark.slow)])
def test_sigkill_of_one_rank_ends_the_job(launcher, demo_data, job, tmp_path):
    """kill -9 of rank 1 mid-run: the job exits non-zero within 60 s and leaves no process behind; torchrun
    tears the group down; without an agent (srun), rank 0 fails in its next collective."""
    out = tmp_path / "run"
    args = _overrides(demo_data, out, **{"train.steps": 1000, "train.ckpt_every": 0})
    if launcher == "torchrun":
        main = job.start([PY, *TRAIN, "--nproc-per-node", "2", *args], clean_env(), "torchrun")
    else:
        job_id = free_slurm_job_id()
        main = job.start([PY, *TRAIN, *args], srun_task_env(0, 2, job_id, PIPELINE_DIST_TIMEOUT=30), "task0")
        job.start([PY, *TRAIN, *args], srun_task_env(1, 2, job_id, PIPELINE_DIST_TIMEOUT=30), "task1")
    wait_for(lambda: last_step(out) >= 2, 300, "step 2", job)
    everything = job.descendants()
    victim = job.procs[1].pid if launcher == "srun" else rank_processes(job, 1)[0].pid
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    if launcher == "srun":  # no agent: rank 0's next collective fails (gloo: connection reset by the dead peer)
        wait_for(lambda: "Error" in job.log("task0"), 60, "rank 0 to fail", interval=1)
        _exits_in_time(main, job, 30, "task0")
    try:
        main.wait(90)
    except Exception:
        raise AssertionError(f"still running 90 s after the kill:\n{job.logs()}") from None
    elapsed = time.monotonic() - killed
    assert main.returncode != 0
    assert elapsed < 60, f"{elapsed:.0f} s\n{job.logs()}"
    deadline = time.monotonic() + 15  # orphaned loader workers notice their parent is gone within ~5 s
    while alive(everything) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(everything), [p.cmdline()[:4] for p in alive(everything)]


STALL_TIMEOUT_S = 20  # PIPELINE_DIST_TIMEOUT of the stalled-rank test
# After the timeout, rank 0 needs at most the step it was in (about 1 s here) and its exit (traceback, loader
# shutdown, interpreter teardown: about 3 s) on a loaded 2-core machine. Without a timeout on a group, torch's
# default holds it for 30 minutes.
STEP_AND_EXIT_S = 20


@pytest.mark.slow
@pytest.mark.parametrize("group", ["deepspeed", "default"])
def test_stalled_rank_makes_the_others_exit_after_the_timeout(group, demo_data, job, tmp_path):
    """Rank 1 hangs (SIGSTOP: its sockets stay open) inside an all-reduce on a process group DeepSpeed made
    (the gradient all-reduce) or on the default group (the loop's own): without an agent, rank 0 leaves the
    collective after PIPELINE_DIST_TIMEOUT and exits non-zero, whichever group it waits in."""
    out, trigger = tmp_path / "run", tmp_path / "stall"
    args = _overrides(demo_data, out, **{"train.steps": 1000, "train.ckpt_every": 0})
    job_id = free_slurm_job_id()
    main = job.start([PY, *TRAIN, *args], srun_task_env(0, 2, job_id, PIPELINE_DIST_TIMEOUT=STALL_TIMEOUT_S), "task0")
    hook = os.pathsep.join([str(REPO / "tests" / "launch" / "stall_hook"), clean_env()["PYTHONPATH"]])
    job.start([PY, *TRAIN, *args], srun_task_env(1, 2, job_id, PIPELINE_DIST_TIMEOUT=STALL_TIMEOUT_S, PYTHONPATH=hook,
                                                 TEST_STALL_TRIGGER=trigger, TEST_STALL_GROUP=group), "task1")
    wait_for(lambda: last_step(out) >= 2, 300, "step 2", job)
    trigger.touch()
    wait_for(lambda: Path(f"{trigger}.stopped").exists(), 60, f"rank 1 to stop in an all-reduce ({group} group)", job,
             interval=0.1)
    rc = job.exit_code(main, STALL_TIMEOUT_S + STEP_AND_EXIT_S, f"rank 0, its peer hung in the {group} group,")
    assert rc != 0, job.logs()
    assert "Timed out" in job.log("task0"), job.logs()  # gloo's timeout, not another failure


@pytest.mark.slow
def test_torchrun_two_agents_with_c10d_rendezvous(demo_data, job, tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` twice on this machine: two 'nodes'."""
    out = tmp_path / "run"
    port = free_port()
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", f"test{port}"]
    for node in range(2):
        job.start([PY, "-m", "torch.distributed.run", *rdzv, *TRAIN, *_overrides(demo_data, out, **{"train.steps": 2})],
                  clean_env(), f"node{node}")
    assert job.wait(400) == [0, 0], job.logs()
    _check_run(out, 2, 2)


@pytest.mark.slow
def test_torchrun_sh_two_nodes(demo_data, job, tmp_path):
    """launch/torchrun.sh --nnodes 2 on this machine (what slurm.sbatch runs on each node)."""
    out = tmp_path / "run"
    port = free_port()
    for node in range(2):
        job.start(["bash", REPO / "launch" / "torchrun.sh", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"sh{port}", "--config", DEMO_CONFIG,
                   *_overrides(demo_data, out, **{"train.steps": 2})], clean_env(), f"node{node}")
    assert job.wait(400) == [0, 0], job.logs()
    _check_run(out, 2, 2)


@pytest.mark.slow
def test_accelerate_launch_with_the_deepspeed_config(demo_data, job, tmp_path):
    out = tmp_path / "run"
    job.start([shutil.which("accelerate") or PY.replace("python", "accelerate"), "launch", "--config_file",
               REPO / "launch" / "accelerate_deepspeed.yaml", "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *TRAIN,
               *_overrides(demo_data, out, **{"train.steps": 2, "train.zero_stage": 2})], clean_env(), "accelerate")
    assert job.wait(400) == [0], job.logs()
    _check_run(out, 2, 2)


@pytest.mark.slow
def test_deepspeed_launcher(demo_data, job, tmp_path):
    """`deepspeed --num_gpus 2 --module pipeline train ...` (on the CPU the launcher counts LOCAL_SIZE ranks);
    the launcher appends --local_rank=N, which the train verb accepts."""
    out = tmp_path / "run"
    deepspeed = os.path.join(os.path.dirname(PY), "deepspeed")
    job.start([PY, deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pipeline", "train",
               "--config", DEMO_CONFIG, *_overrides(demo_data, out, **{"train.steps": 2})],
              clean_env(LOCAL_SIZE=2), "deepspeed")
    assert job.wait(400) == [0], job.logs()
    _check_run(out, 2, 2)


@pytest.mark.slow
def test_torchrun_sh_stops_on_sigusr1_with_exit_75_and_resumes(demo_data, job, tmp_path):
    """SIGUSR1 (SLURM's --signal warning) to launch/torchrun.sh: the ranks finish the step, checkpoint and stop;
    the script exits 75; the same command again resumes from that checkpoint and finishes."""
    out = tmp_path / "run"
    cmd = ["bash", REPO / "launch" / "torchrun.sh", "--nproc-per-node", "2", "--config", DEMO_CONFIG,
           *_overrides(demo_data, out, **{"train.steps": 30, "train.ckpt_every": 0, "train.resume": "auto"})]
    first = job.start(cmd, clean_env(PIPELINE_SHUTDOWN_TIMEOUT=60), "first")
    wait_for(lambda: last_step(out) >= 2, 300, "step 2", job)
    os.kill(first.pid, signal.SIGUSR1)
    assert job.exit_code(first, 200, "torchrun.sh after SIGUSR1") == 75, job.logs()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and 2 <= int(ckpts[0][5:]) < 30, ckpts
    stopped_at = int(ckpts[0][5:])
    second = job.start(cmd, clean_env(), "second")
    assert second.wait(400) == 0, job.logs()
    assert "resumed from" in job.log("second") and (out / "checkpoints" / "latest").read_text() == "step_00000030"
    assert _steps(out)[-1] == 30 and stopped_at in _steps(out)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(demo_data, job, tmp_path):
    """A rank killed after the step-3 checkpoint: torchrun --max-restarts 1 restarts the group, which resumes
    from step 3 (train.resume=auto) and finishes with exit 0."""
    out = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           *TRAIN, *_overrides(demo_data, out, **{"train.steps": 8, "train.ckpt_every": 3, "train.resume": "auto"})]
    main = job.start(cmd, clean_env(), "torchrun")
    wait_for(lambda: last_step(out) >= 4, 300, "step 4", job)
    os.kill(rank_processes(job, 1)[0].pid, signal.SIGKILL)
    assert main.wait(400) == 0, job.logs()
    assert job.log("torchrun").count("resumed from") >= 1
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["slurm_srun.sbatch", "slurm.sbatch"])
def test_sbatch_script_forwards_the_warning_and_requeues(script, demo_data, job, tmp_path):
    """The batch scripts under stand-in `srun` / `scontrol` (one node, 2 ranks): SIGUSR1 to the batch shell (what
    --signal=B:USR1@120 does) reaches the ranks, they checkpoint and stop, the script runs `scontrol requeue` and
    exits 75."""
    out, job_id = tmp_path / "run", free_slurm_job_id()
    env = clean_env(PATH=f"{fake_slurm_bin(tmp_path / 'bin')}:{os.environ['PATH']}", SLURM_JOB_ID=job_id,
                    SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=2, SLURM_JOB_NUM_NODES=1,
                    FAKE_SRUN_TASKS=2 if script == "slurm_srun.sbatch" else 1, GPUS_PER_NODE=2,
                    FAKE_SCONTROL_LOG=tmp_path / "scontrol.log", PIPELINE_PYTHON=PY,
                    PIPELINE_SHUTDOWN_TIMEOUT=60)  # torchrun's grace for the ranks (bounds a rank stuck at exit)
    batch = job.start(["bash", REPO / "launch" / script, "--config", DEMO_CONFIG,
                       *_overrides(demo_data, out, **{"train.steps": 30, "train.ckpt_every": 0})], env, "batch")
    wait_for(lambda: last_step(out) >= 2, 300, "step 2", job)
    os.kill(batch.pid, signal.SIGUSR1)
    assert job.exit_code(batch, 200, "batch script after SIGUSR1") == 75, job.logs()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", job_id]
    assert "requeueing job" in job.log("batch")
    ckpts = [p.name for p in (out / "checkpoints").glob("step_*")]
    assert len(ckpts) == 1 and int(ckpts[0][5:]) < 30
