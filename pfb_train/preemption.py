"""Cluster preemption: SIGTERM / SIGUSR1 end the run at a step boundary, after a checkpoint."""

from __future__ import annotations

import signal
import threading

import torch

from pfb_train.distributed import all_reduce_sum, is_distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Records SIGTERM/SIGUSR1 instead of dying; `requested(step)` says when to stop.

    Under DDP every rank must stop at the same step, so the flag is summed over ranks, every
    `every` steps (one tiny all-reduce, not one per step)."""

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

    def requested(self, step: int) -> int:
        """The signal to stop for (0: go on). Collective under DDP: call it on every rank each step."""
        if not is_distributed():
            return self.signum
        if step % self.every:
            return 0
        flag = torch.tensor([float(self.signum)], device=self.device)
        return (self.signum or signal.SIGTERM) if all_reduce_sum(flag).item() else 0
