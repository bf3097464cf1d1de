"""Stop cleanly when the scheduler asks: a signal (SIGTERM, SIGUSR1 by default) sets a flag; the training loop
polls `requested()` once per optimizer step, which agrees across ranks (an all-reduce of the flag), so every
rank stops after the same step, saves a checkpoint and exits with PREEMPTION_EXIT_CODE.

Exit code 75 is EX_TEMPFAIL from sysexits.h ("temporary failure; the user is invited to retry"): the run is
incomplete but resumable, and the SLURM scripts in launch/ requeue a job whose step ends with it.

    flag = PreemptionFlag()            # installs the handlers (main thread only)
    ...
    while step < steps:
        ...one optimizer step...
        if flag.requested():           # collective: every rank calls it at the same point
            save_checkpoint(...)
            sys.exit(PREEMPTION_EXIT_CODE)

PIPELINE_PREEMPT_SIGNALS (e.g. "SIGTERM,SIGUSR1,SIGUSR2") overrides the signal list.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


def parse_signals(names: str | tuple[str, ...] | list[str]) -> list[signal.Signals]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        n = name.strip().upper()
        if not n.startswith("SIG"):
            n = "SIG" + n
        try:
            out.append(signal.Signals[n])
        except KeyError:
            raise ValueError(f"unknown signal {name!r}") from None
    return out


class PreemptionFlag:
    """Signal handlers that set a local flag; `requested()` is the flag of any rank (a collective)."""

    def __init__(self, signals: str | tuple[str, ...] | list[str] | None = None, install: bool = True):
        if signals is None:
            signals = os.environ.get("PIPELINE_PREEMPT_SIGNALS") or DEFAULT_SIGNALS
        self.signals = parse_signals(signals)
        self._received: signal.Signals | None = None
        self._received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        if install:
            self.install()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag must be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Only flags: the step in flight finishes, then the loop checkpoints. A repeated signal (SLURM and the
        # launcher may both deliver one) changes nothing.
        if self._received is None:
            self._received = signal.Signals(signum)
            self._received_at = time.monotonic()
            print(f"[preemption] {self._received.name} received: stopping after this step", file=sys.stderr,
                  flush=True)

    def set(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """As if `sig` had arrived (for tests and for a loop that wants to stop itself)."""
        self._handle(int(sig), None)

    @property
    def local(self) -> bool:
        """This rank received a signal (no communication)."""
        return self._received is not None

    @property
    def received(self) -> signal.Signals | None:
        return self._received

    def requested(self, group=None) -> bool:
        """True on every rank when any rank received a signal. Collective when a process group is up: call it
        on every rank at the same point (once per optimizer step). The flag travels as a CPU tensor over `group`
        (a gloo group: `pipeline.train.distributed.host_group()`, None for the default group when that is gloo),
        so polling it every step never waits for the GPU."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.local
        flag = torch.tensor([1 if self.local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
