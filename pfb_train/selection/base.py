"""The interface every selection method implements, and the blocking schedule they share.

The training loop calls these hooks and nothing else; it never asks which method runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from pfb_train.distributed import get_rank
from pfb_train.errors import UserError
from pfb_train.selection.score_pass import EXACT_SCORE, ScorePass
from pfb_train.seeding import derive_seed


@dataclass
class BlockingSchedule:
    """Blocking is active for epochs [start, end); the blocked ratio may ramp up. Epochs here are schedule
    epochs (Selector.set_epoch's `position`): under schedule.budget an epoch may start at any point of them."""

    ratio: float
    start: float = 0
    end: Optional[float] = None  # None: never ends
    ramp: str = "constant"  # constant | linear_to_mid

    def active(self, epoch: float) -> bool:
        return self.start <= epoch and (self.end is None or epoch < self.end)

    def ratio_at(self, epoch: float) -> float:
        if not self.active(epoch):
            return 0.0
        if self.ramp == "linear_to_mid":  # 0.2 * ratio at `start`, full ratio from end/2 on
            assert self.end is not None, "ramp 'linear_to_mid' needs an end"  # WindowOptions.check says so first
            mid = self.end / 2
            return self.ratio * (0.2 + 0.8 * (min(epoch, mid) - self.start) / (mid - self.start))
        return self.ratio

    def kept(self, batch: int, epoch: float) -> int:
        """Rows kept of a batch of `batch`: fixed per step, so DDP ranks agree and nothing syncs."""
        return batch - round(self.ratio_at(epoch) * batch)


@dataclass
class WindowOptions:
    """Options of a batch-level method that blocks a fixed fraction of each batch during an epoch window."""

    ratio: float = 0.4  # fraction of each batch blocked while active
    start_epoch: int = 0  # blocking is active for epochs [start_epoch, end_epoch)
    end_epoch: Optional[int] = None  # None: until the last epoch
    ramp: Literal["constant", "linear_to_mid"] = "constant"

    def schedule(self, epochs: Optional[int]) -> BlockingSchedule:
        end = self.end_epoch if self.end_epoch is not None else epochs
        return BlockingSchedule(self.ratio, self.start_epoch, end, self.ramp)

    def check(self, run, key) -> None:
        """`key(option)`: the option's full config key, for messages."""
        need(0.0 <= self.ratio < 1.0, f"config key '{key('ratio')}' must be in [0, 1), got {self.ratio}")
        need(self.start_epoch >= 0, f"config key '{key('start_epoch')}' must be >= 0, got {self.start_epoch}")
        # A run shorter than the warm-up (a quick check of a recipe) is full data; an explicit empty window is a mistake.
        need(
            self.end_epoch is None or self.end_epoch > self.start_epoch,
            f"config key '{key('end_epoch')}' ({self.end_epoch}) must be greater than '{key('start_epoch')}' "
            f"({self.start_epoch})",
        )
        end = self.end_epoch if self.end_epoch is not None else run.epochs
        if self.ramp == "linear_to_mid":
            need(end is not None, f"{key('ramp')} 'linear_to_mid' needs an end: set {key('end_epoch')}")
            if self.start_epoch < end:
                need(
                    end / 2 > self.start_epoch,
                    f"{key('ramp')} 'linear_to_mid' needs end_epoch/2 ({end / 2}) > start_epoch ({self.start_epoch})",
                )
        if self.ratio > 0 and run.batch_size is not None:
            need(
                round(self.ratio * run.batch_size) < run.batch_size,
                f"{key('ratio')} {self.ratio} would block every row of a batch of {run.batch_size}",
            )


def need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


class Selector:
    """Base: keeps everything. Methods override the hooks they need."""

    # Entries of `state_dict()` that differ between ranks: a checkpoint keeps every rank's (resume.py),
    # the rest once (rank 0's; a method keeps it equal on every rank through its own collectives).
    # A resume with another number of processes gives each rank the values it was built with, except
    # what `merge_rank_states` gives rank 0.
    rank_local: tuple[str, ...] = ("generators",)

    def __init__(self, seed: int = 0):
        self.seed = derive_seed("selector", seed, get_rank())  # ranks hold different data: draw different noise
        self.epoch = 0
        self.position = 0.0
        self._generators: dict[torch.device, torch.Generator] = {}

    def set_epoch(self, epoch: int, position: Optional[float] = None) -> None:
        """The epoch about to start. `position`: where it starts on the run's schedule, in schedule epochs
        (budget.RunClock; None: `epoch`, as in a run without schedule.budget). Windows and other options
        stated in epochs are read at `position`; random streams and per-epoch draws follow `epoch`."""
        self.epoch = epoch
        self.position = float(epoch) if position is None else position

    def epoch_indices(self, num_samples: int) -> Optional[torch.Tensor]:
        """Sampler-level selection: the dataset indices to visit this epoch; None = all."""
        return None

    def fewest_samples(self, num_samples: int) -> int:
        """How few of a training set of `num_samples` an epoch's `epoch_indices` may visit, as far as the
        options tell before training (a subset drawn from losses can only be estimated). The harness
        refuses at start-up a run where this is under one global batch: such an epoch has no step."""
        return num_samples

    def blocks_rows(self) -> bool:
        """Whether `select` may drop rows this epoch; if not, the step runs the plain model."""
        return False

    def needs_features(self) -> bool:
        """Whether `observe` uses the shallow features this epoch (they are pooled only if so)."""
        return False

    def select(self, feats: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Batch-level selection: which rows of the batch go on through the deep part.

        `feats`: (B, C) float32 pooled shallow features of every row (recompute mode: from its ranking
        pass), on the training device. `labels`: (B,) int64 class of every row (under mixup/cutmix the
        dominant one), on that device; None where the caller has none. Returns the kept rows' positions
        in the batch: a (k,) int64 tensor on that device, sorted ascending, without repeats, where k
        depends only on B and the epoch (the same count on every rank and every step, so DDP's
        all-reduce and compiled shapes hold); None keeps every row. Called only in epochs where `blocks_rows()` is true. The base keeps every row
        and raises nothing; a method may raise ValueError on features it cannot rank (PFB: a first batch
        with fewer rows than its centres)."""
        return None

    def score_pass(self) -> ScorePass:
        """How recompute mode's ranking pass computes the features `select` gets (size, norm statistics)."""
        return EXACT_SCORE

    def loss_weights(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample loss multipliers for the kept rows; None = unweighted mean."""
        return None

    def observe(self, feats, keep, indices, losses, labels=None) -> None:
        """After the step: feats of all rows (or None), kept rows, their dataset indices, losses and
        classes ((k,) int64, the dominant one under mixup/cutmix; None where the caller has none).
        A negative index marks a row that holds no sample (an unreadable file's stand-in): leave it out."""

    def epoch_diagnostics(self, device) -> dict:
        """Once per epoch, on every rank (it may be collective): what decided this epoch's selection,
        for the epoch's metrics record (see selection/diagnostics.py). Read once, then reset."""
        return {}

    def generator(self, device: torch.device) -> torch.Generator:
        """A per-device generator, seeded from the run's seed and this process's rank."""
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict:
        """This process's whole state (its `rank_local` entries included); tensors as the method holds them."""
        return {"epoch": self.epoch, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    @staticmethod
    def merge_rank_states(states: list[dict]) -> dict:
        """The `rank_local` entries rank 0 resumes with when the number of processes changed, from every
        saved rank's (`states`: one dict per saved rank). The base keeps none: random streams restart
        from the seed. A method with per-rank tallies that are summed over ranks sums them here."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        for device, rng in state.get("generators", {}).items():
            self.generator(torch.device(device)).set_state(rng)
