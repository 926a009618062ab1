"""What decided a score-based selection, tallied on the device and read once per epoch.

- `selection_signal`: the share of the blocked rows that the scores *without* the random term
  would also have blocked. 1.0: the density alone decides; about the blocked ratio (what a
  uniformly random choice scores): the random term decides.
- `{blocked,kept}_density_q{10,50,90}`: quantiles of the blocked and of the kept rows' density
  percentile in their own batch (0: the rarest row, 1: the most common), averaged over steps.
  Percentiles, not raw log-densities, so epochs, estimators and feature sizes compare.
"""

from __future__ import annotations

from typing import Optional

import torch

from pfb_train.distributed import all_reduce_sum

QUANTILES = (0.1, 0.5, 0.9)


def batch_ranks(s: torch.Tensor) -> torch.Tensor:
    """Each score's rank in its batch: 0 for the lowest, B - 1 for the highest (ties by position)."""
    return torch.argsort(torch.argsort(s, stable=True))


def within_batch_rank(s: torch.Tensor) -> torch.Tensor:
    """Each score's rank in its batch, scaled to [0, 1] (0: lowest, 1: highest)."""
    return batch_ranks(s).float() / max(s.shape[0] - 1, 1)


def _quantiles(sorted_values: torch.Tensor) -> torch.Tensor:
    """Nearest-rank quantiles of a sorted vector; positions are host integers, so nothing syncs."""
    last = sorted_values.shape[0] - 1
    return torch.stack([sorted_values[round(q * last)] for q in QUANTILES])


class SelectionStats:
    """Per-epoch totals of one rank; `read()` sums them over ranks (collective) and starts afresh."""

    def __init__(self):
        self.totals = None  # on the device: overlap with the density's choice, kept quantile sums, blocked ones
        self.blocked = self.steps = 0  # host integers: blocked rows and steps that blocked rows

    def add(
        self, clean: torch.Tensor, keep: torch.Tensor, blocked: torch.Tensor, by_density: Optional[torch.Tensor] = None
    ) -> None:
        """`clean`: (B,) scores without the random term (higher = blocked first); `keep`/`blocked`:
        the row indices the selection kept and blocked; `by_density`: (B,) bool, the rows the scores
        alone would block under the selection's own rule (None: the highest-scored of the batch)."""
        n_blocked = blocked.shape[0]
        if n_blocked == 0 or keep.shape[0] == 0:
            return
        ranks = batch_ranks(clean)
        if by_density is None:
            by_density = ranks >= clean.shape[0] - n_blocked
        overlap = by_density.index_select(0, blocked).sum()
        pct = ranks.float() / (clean.shape[0] - 1)
        step = torch.cat(
            [
                overlap.view(1).to(pct.dtype),
                _quantiles(pct.index_select(0, keep).sort().values),
                _quantiles(pct.index_select(0, blocked).sort().values),
            ]
        ).double()
        # totals resumed from a checkpoint sit on the CPU: joined to the device once (a no-op after)
        self.totals = step if self.totals is None else self.totals.to(step.device) + step
        self.blocked += n_blocked
        self.steps += 1

    def read(self, device) -> dict:
        """This epoch's diagnostics over all ranks (every rank must call it), then reset.
        `device`: where the collective runs (the training device)."""
        n = len(QUANTILES)
        totals = torch.zeros(1 + 2 * n, dtype=torch.float64, device=device)
        if self.totals is not None:
            totals += self.totals.to(device)
        counts = torch.tensor([self.blocked, self.steps], dtype=torch.float64).to(device)
        overlap, *quantiles, blocked, steps = all_reduce_sum(torch.cat([totals, counts])).tolist()
        self.totals, self.blocked, self.steps = None, 0, 0
        if steps == 0:
            return {"selection_signal": None}
        out = {"selection_signal": overlap / blocked}
        for i, q in enumerate(QUANTILES):
            out[f"kept_density_q{round(100 * q)}"] = quantiles[i] / steps
            out[f"blocked_density_q{round(100 * q)}"] = quantiles[n + i] / steps
        return out

    def state_dict(self) -> dict:
        return {
            "totals": None if self.totals is None else self.totals.cpu(),
            "blocked": self.blocked,
            "steps": self.steps,
        }

    def load_state_dict(self, state) -> None:
        if state:
            self.totals, self.blocked, self.steps = state["totals"], state["blocked"], state["steps"]

    @staticmethod
    def merge(states: list) -> dict:
        """One `state_dict()` holding the sum of several ranks' (None entries: nothing tallied)."""
        states = [s for s in states if s]
        totals = [s["totals"] for s in states if s["totals"] is not None]
        return {
            "totals": torch.stack(totals).sum(0) if totals else None,
            "blocked": sum(s["blocked"] for s in states),
            "steps": sum(s["steps"] for s in states),
        }
