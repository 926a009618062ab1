"""Cluster preemption: SIGTERM / SIGUSR1 end the run at a step boundary, after a checkpoint.

A scheduler (SLURM) or torchrun sends the signal to every process of the job, DataLoader workers
included: the workers drop it (`StopSafeDataLoader`) and the training process stops at the next check
(`PreemptionSignals.requested`), on every rank at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
from torch.utils.data import DataLoader

from pfb_train.distributed import all_reduce_sum, is_distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold SIGTERM/SIGUSR1 back in this thread (they stay pending, and arrive on leaving): a process
    forked inside starts with them blocked, so no signal reaches it before `ignore_stop_signals`."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker lives through SIGTERM/SIGUSR1 sent to the whole job, and
    still ends at once when its own training process terminates it (a loader shutting down, the
    interpreter's exit).

    Schedulers and torchrun signal every process of the job. PyTorch's workers die of a SIGTERM from
    any process but their parent, and the training process then fails with "DataLoader worker ... is
    killed by signal" before it can checkpoint. Here the signals stay blocked and a thread takes them
    (`sigwaitinfo` names the sender): the parent's ends the worker as PyTorch's own handler does, any
    other is dropped. The loader's workers start with the signals blocked (`StopSafeDataLoader`);
    where `sigwaitinfo` does not exist (macOS), PyTorch's handling stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_end_when_the_parent_asks, args=(os.getppid(),), daemon=True,
                     name="stop-signals").start()


def _end_when_the_parent_asks(parent: int) -> None:
    while True:
        if signal.sigwaitinfo(SIGNALS).si_pid == parent:
            os._exit(0)


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose workers outlive a SIGTERM/SIGUSR1 sent to the whole job (`ignore_stop_signals`
    as their `worker_init_fn`): they are forked with the signals blocked, so none comes between their
    start and the function."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=ignore_stop_signals, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_blocked():  # the workers are forked here (once, when persistent)
            return super()._get_iterator()


class PreemptionSignals:
    """Records SIGTERM/SIGUSR1 instead of dying; `requested(step)` says when to stop.

    Under DDP every rank must stop at the same step, so the flag is summed over ranks (one tiny
    all-reduce and a host read) every `every` steps, not every step, and wherever the caller forces
    it: at an epoch's last step and after its checkpoint, so neither a short epoch nor an evaluation
    hides a signal. One process checks its own flag at every call."""

    def __init__(self, every: int = 1, device: torch.device | None = None):
        self.every, self.device = every, device or torch.device("cpu")
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame):
        self.signum = signum

    def requested(self, step: int, force: bool = False) -> int:
        """The signal to stop for (0: go on): checked when `step` is a multiple of `every` or `force`.
        Collective under DDP: every rank calls it at every step, with the same `force`."""
        if not is_distributed():
            return self.signum
        if step % self.every and not force:
            return 0
        flag = torch.tensor([float(self.signum)], device=self.device)
        return (self.signum or signal.SIGTERM) if all_reduce_sum(flag).item() else 0
