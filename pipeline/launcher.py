"""Starting local ranks: `python -m pipeline <verb> --nproc-per-node N` (train, eval) and the demo run the same
verb again under torchrun, one process per rank, on this machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Starts `nproc` ranks of `python -m pipeline <argv>` under torchrun on this machine; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline", *argv]
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator probing and its warning
    child = subprocess.Popen(cmd, env=env)
    # A scheduler's notice to this process is passed on as SIGTERM, which torchrun forwards to the ranks (they
    # checkpoint and exit 75); torchrun itself would die on SIGUSR1
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda _signum, _frame: child.send_signal(signal.SIGTERM))
    return child.wait()
