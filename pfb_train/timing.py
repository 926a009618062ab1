"""Where a step's time goes: data, shallow part, selection, deep part, observe (engine.py)."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Splits step time into named phases (data / shallow / deep) without syncing every step.

    `mark(phase)` charges the time since the previous mark to `phase`. On CUDA the marks are
    events resolved once in `totals()`, so the hot path never waits for the GPU.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA only
        self.last = self._now()

    def reset_clock(self) -> None:
        """Start the next phase now (time before this belongs to no phase)."""
        self.last = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self.pending.append((phase, self.last, now))
        else:
            self.seconds[phase] += now - self.last
        self.last = now

    def totals(self) -> dict[str, float]:
        if self.pending:
            torch.cuda.synchronize()
            for phase, start, end in self.pending:
                self.seconds[phase] += start.elapsed_time(end) / 1000.0
            self.pending.clear()
        return dict(self.seconds)
