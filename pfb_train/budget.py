"""The run's clock: where a run is on its schedule, and when it ends.

Everything the config states in epochs (the LR schedule's warm-up and decay, blocking windows and ramps,
InfoBatch's `delta`) is read off this clock, in *schedule epochs* from 0 to `schedule.epochs`:

- without `schedule.budget`, epoch e, a fraction f through it, is at e + f, and the run ends after
  `schedule.epochs` epochs;
- with a budget, the configured schedule is stretched over the budget: a run that has spent the share
  spent/budget of it is at (spent / budget) x schedule.epochs, and it ends at the optimizer step where
  the budget is spent (Li et al., "Budgeted Training", ICLR 2020: decay over the whole budget). So one
  recipe keeps its shape at any budget, and every method ends its LR schedule when its budget ends.

A budget counts compute (`unit` epochs: full-data epochs of this model, image size and data set, by the
cost model from each step's realised rows, costs.StepCost) or training seconds (`unit` seconds: the epochs'
time, evaluation excluded; each epoch record and every checkpoint hold the time spent so far).
"""

from __future__ import annotations

import math
from typing import Optional

from pfb_train.distributed import all_gather_objects, is_distributed

UNITS = ("epochs", "seconds")
SPENT = 1 - 1e-9  # a budget counts as spent at this share of it: sums of step costs round


class RunClock:
    """The clock of one run (module docstring). `epochs`: schedule.epochs; `budget`: schedule.budget (None:
    none), in `unit` (epochs: full-data epochs of compute; seconds: training seconds). `every`: under DDP the
    ranks agree on a seconds budget's time every `every` optimizer steps (one small collective; between
    agreements the clock holds the agreed time), so a seconds budget may run that many steps over."""

    def __init__(self, epochs: int, budget: Optional[float] = None, unit: str = "epochs", every: int = 1):
        if unit not in UNITS:
            raise ValueError(f"unknown budget unit {unit!r}; choose one of: {', '.join(UNITS)}")
        self.epochs, self.budget, self.unit, self.every = epochs, budget, unit, every
        self.agreed_seconds: Optional[float] = None  # under DDP, the ranks' latest agreed time

    def spent(self, compute: float, seconds: float) -> float:
        """What the budget counts of `compute` (full-data epochs) and `seconds` (training seconds) spent."""
        return seconds if self.unit == "seconds" else compute

    def position(self, epochs_done: float, compute: float, seconds: float) -> float:
        """Schedule epochs (0 to `epochs`) after `epochs_done` epochs (fractional within one), `compute` and
        `seconds` spent."""
        if self.budget is None:
            return epochs_done
        return min(self.epochs * self.spent(compute, seconds) / self.budget, self.epochs)  # exact at whole epochs

    def budget_spent(self, compute: float, seconds: float) -> bool:
        """Whether the run's budget is spent (False without one)."""
        return self.budget is not None and self.spent(compute, seconds) >= self.budget * SPENT

    def ended(self, epochs_done: float, compute: float, seconds: float) -> bool:
        """Whether the run is over: its epochs trained, or its budget spent."""
        return self.budget_spent(compute, seconds) if self.budget is not None else epochs_done >= self.epochs

    def seconds(self, local: float, step: int, force: bool = False) -> float:
        """The training seconds every rank goes by: this process's own (`local`) in a single-process run;
        under DDP the slowest rank's, agreed every `every` steps and where `force` (collective then: every
        rank calls this at every step with the same `force`), held in between."""
        if self.unit != "seconds" or not is_distributed():
            return local
        if self.agreed_seconds is None or force or step % self.every == 0:
            self.agreed_seconds = max(all_gather_objects(local))
        return self.agreed_seconds


def spent_so_far(history: list[dict]) -> tuple[float, float]:
    """(compute in full-data epochs, training seconds) spent by the epochs of `history` (epoch records: their
    cumulative `compute` and `seconds_spent`)."""
    if not history:
        return 0.0, 0.0
    last = history[-1]
    return last.get("compute", 0.0), last.get("seconds_spent", math.fsum(r["epoch_seconds"] for r in history))


def budget_epochs(budget: float, epochs: int, cost_at, points: int = 1000) -> float:
    """How many epochs a compute budget of `budget` full-data epochs buys when an epoch at schedule position
    t (0 to `epochs`) costs `cost_at(t)` full-data epochs of compute (1: full data). The clock spreads the
    budget evenly over the schedule (budget / epochs of compute per schedule epoch), so the epochs trained
    are the integral of (budget / epochs) / cost_at(t) over the schedule: midpoint rule, `points` slices."""
    width = epochs / points
    compute_per_schedule_epoch = budget / epochs
    return sum(compute_per_schedule_epoch * width / cost_at((i + 0.5) * width) for i in range(points))
