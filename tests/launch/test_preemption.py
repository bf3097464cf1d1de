"""PreemptionFlag: signals set a flag, every rank agrees on it at the same step, handlers are restored."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from pipeline.train.preemption import PREEMPTION_EXIT_CODE, PreemptionFlag, parse_signals


def test_exit_code_is_ex_tempfail():
    assert PREEMPTION_EXIT_CODE == 75


def test_parse_signals():
    assert parse_signals("SIGTERM, usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals(["USR2"]) == [signal.SIGUSR2]
    with pytest.raises(ValueError, match="SIGNOPE"):
        parse_signals("SIGNOPE")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_once_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.local and not flag.requested()  # no process group: the local flag
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # a second delivery (scheduler and launcher both) changes nothing
        assert flag.local and flag.requested() and flag.received == sig
    assert signal.getsignal(sig) == before


def test_configurable_signals(monkeypatch):
    monkeypatch.setenv("PIPELINE_PREEMPT_SIGNALS", "SIGUSR2")
    flag = PreemptionFlag()
    try:
        assert flag.signals == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.local
    finally:
        flag.restore()


def test_every_rank_stops_at_the_same_step(tmp_path):
    """Two gloo ranks; only rank 1 receives SIGUSR1, before step 3: both see requested() at step 3."""
    script = textwrap.dedent("""
        import os, signal, sys
        import torch.distributed as dist
        from pipeline.train.preemption import PreemptionFlag
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2)
        flag = PreemptionFlag()
        stopped = None
        for step in range(1, 6):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if flag.requested():
                stopped = step
                break
        print(f"rank {rank} local {flag.local} stopped {stopped}", flush=True)
        dist.destroy_process_group()
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / "store")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank 0 local False stopped 3" in outs[0][0]
    assert "rank 1 local True stopped 3" in outs[1][0]
