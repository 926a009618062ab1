"""Cluster preemption: SIGTERM / SIGUSR1 end the run at a step boundary, after a checkpoint.

A scheduler (SLURM, Kubernetes) or torchrun sends the signal to the whole process group, DataLoader
workers included: the workers ignore it (`ignore_stop_signals`) and the training process stops at
the next check (`PreemptionSignals.requested`), on every rank at the same step.
"""

from __future__ import annotations

import signal
import threading

import torch

from pfb_train.distributed import all_reduce_sum, is_distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker lives through SIGTERM/SIGUSR1 sent to its process group.

    PyTorch's workers otherwise die of a SIGTERM from any process but their parent, and the training
    process then fails with "DataLoader worker ... is killed by signal" before it can checkpoint. An
    ignoring worker still ends with its loader, or on its own once the training process is gone."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
