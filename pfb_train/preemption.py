"""Cluster preemption and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT end the run at a step boundary, after a checkpoint.

A scheduler (SLURM) or torchrun sends the signal to every process of the job, DataLoader workers
included (a terminal's Ctrl-C reaches the whole foreground process group too): the workers drop it
(`StopSafeDataLoader`) and the training process stops at the next check (`PreemptionSignals.requested`),
on every rank at the same step. A second SIGINT aborts at once (KeyboardInterrupt), without a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from pfb_train.distributed import all_reduce_sum, is_distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold SIGTERM/SIGUSR1/SIGINT back in this thread (they stay pending, and arrive on leaving): a process
    forked inside starts with them blocked (a mask survives fork and exec), so no signal reaches it
    before `ignore_stop_signals`."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(training_process: int) -> None:
    """In a DataLoader worker: live through SIGTERM/SIGUSR1/SIGINT sent to the whole job, and still end at once
    when the training process (pid `training_process`) terminates the worker (a loader shutting down,
    the interpreter's exit).

    Schedulers and torchrun signal every process of the job. PyTorch's workers die of a SIGTERM from
    any process but their parent, and the training process then fails with "DataLoader worker ... is
    killed by signal" before it can checkpoint. Here the signals stay blocked and a thread takes them
    (`sigwaitinfo` names the sender): the training process's ends the worker as PyTorch's own handler
    does, any other is dropped. Limits: a worker stuck in C code that holds the GIL cannot be ended by
    a signal then; processes the worker starts inherit the blocked signals. Needs `sigwaitinfo` (not
    on macOS) and a worker forked with the signals blocked (`StopSafeDataLoader`)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_end_when_asked_by, args=(training_process,), daemon=True, name="stop-signals").start()


def _end_when_asked_by(training_process: int) -> None:
    while True:
        if signal.sigwaitinfo(SIGNALS).si_pid == training_process:
            os._exit(0)


def _init_worker(training_process: Optional[int], then: Optional[Callable], worker_id: int) -> None:
    if training_process is not None:
        ignore_stop_signals(training_process)
    if then is not None:
        then(worker_id)


def start_method(context) -> str:
    """How a DataLoader with `multiprocessing_context` `context` starts its workers (fork, spawn, forkserver),
    without fixing the default context as `multiprocessing.get_start_method()` would."""
    if context is not None:
        return context.get_start_method()
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose workers outlive a SIGTERM/SIGUSR1/SIGINT sent to the whole job (`ignore_stop_signals`,
    before the caller's own `worker_init_fn`). Its workers are forked with the signals blocked, so none
    comes between their start and that function (`_get_iterator` is where PyTorch makes the iterator
    and, with it, the workers). Only with the fork start method, Linux's default before Python 3.14:
    a spawned or forkserver worker has threads (OpenMP's) before any init function can block a signal
    in them, so there PyTorch's own handling stays."""

    def __init__(self, *args, worker_init_fn: Optional[Callable] = None, **kwargs):
        kwargs["worker_init_fn"] = worker_init_fn  # by name: `*args` could also reach it, as far as types tell
        super().__init__(*args, **kwargs)
        self.guards_workers = hasattr(signal, "sigwaitinfo") and start_method(self.multiprocessing_context) == "fork"
        training_process = os.getpid() if self.guards_workers else None
        self.worker_init_fn = functools.partial(_init_worker, training_process, worker_init_fn)

    def _get_iterator(self):
        if self.num_workers == 0 or not self.guards_workers:
            return super()._get_iterator()
        with stop_signals_blocked():  # the workers are forked here (once, when persistent)
            return super()._get_iterator()


class PreemptionSignals:
    """Records SIGTERM/SIGUSR1/SIGINT instead of dying; `requested(step)` says when to stop. A SIGINT after a
    SIGINT raises KeyboardInterrupt (Ctrl-C twice: abort now). `announce`: say on stderr what a first
    SIGINT does (rank 0).

    Under DDP every rank must stop at the same step, so the flag is summed over ranks (one tiny
    all-reduce and a host read) every `every` steps, not every step, and wherever the caller forces
    it: at an epoch's last step and after its checkpoint, so neither a short epoch nor an evaluation
    hides a signal. One process checks its own flag at every call."""

    def __init__(self, every: int = 1, device: torch.device | None = None, announce: bool = True):
        self.every, self.device, self.announce = every, device or torch.device("cpu"), announce
        self.signum = 0
        self._previous: dict[signal.Signals, Any] = {}  # the handlers ours replaced (a function, SIG_DFL, ...)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # a background job of a non-interactive shell: Ctrl-C is not meant for it
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.announce:
                sys.stderr.write(
                    "pfb-train: interrupt: stopping with a checkpoint at the end of this step (or "
                    "evaluation); Ctrl-C again aborts at once, without one\n"
                )
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
