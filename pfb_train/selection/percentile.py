"""Class-relative density over time: each row's density as a percentile of its own class's history.

Stratifying inside one batch (stratify.py) needs several rows of a class per batch; at ImageNet's
1000 classes and 256 rows most classes have one row or none, and the quota of a single row is a
coin toss. Here the comparison with the rest of the class is made against the class's *history*:

- every row gets its density rank in its batch, r in [0, 1] (0: the rarest row, 1: the most common);
  ranks do not drift with the density's scale, so batches of any step compare;
- a histogram per class of those ranks, an exponential average that holds about `memory` rows of
  each class (a balanced class's share of it; the decay per step follows the rows of the step, so
  the history spans the same number of rows at any batch size, process count and class count, and
  follows features that change as the model trains), gives the class's running distribution F_y; the row's class percentile is u = F_y(r) (0: the least typical row its
  class has shown, 1: the most typical), drawn uniformly inside the row's bin (the randomised
  probability integral transform: a class whose rows always rank alike, say always the batch's
  densest, still gets percentiles spread over [0, 1], not 1 every time). Blocking the largest u
  makes every class give up about the same share of its rows, whatever its images look like, and
  the density still decides which;
- the histogram's totals give each class's share of the data, pi_y. A row's score is
  log(C * pi_y * u): the share of the data in its class and no more typical than it, relative to a
  balanced class. A class rare in the data scores lower on every row and keeps more of them.

Everything stays on the device with host-known shapes (gathers, cumsums, index_put_), so the step
never waits; the histogram is summed over ranks with the centres' all-reduce, so it is the same on
every rank.
"""

from __future__ import annotations

from typing import Optional

import torch

BINS = 32  # rank resolution of each class's running distribution
PRIOR_ROWS = 2.0  # pseudo-rows of a uniform distribution: a class not seen yet ranks by its batch rank alone


class ClassPercentiles:
    """Running per-class histograms of batch density ranks.

    `num_classes`: C; `memory`: rows per class the histograms hold, in steady state, for a balanced
    set (each step's n rows, summed over ranks, are added after the old counts are multiplied by
    1 - n / (memory * C)). State: `hist`, (C, BINS) float32, identical on every rank. Raises
    ValueError on `num_classes` None or < 1, or `memory` < 1."""

    def __init__(self, num_classes: Optional[int], memory: float):
        if num_classes is None or num_classes < 1:
            raise ValueError(f"class percentiles need the number of classes, got {num_classes}")
        if not 1 <= memory < float("inf"):
            raise ValueError(f"class memory must be >= 1 row per class and finite, got {memory}")
        self.num_classes, self.memory = num_classes, memory
        self.hist: Optional[torch.Tensor] = None  # (C, BINS) float32, created on the first batch's device

    def _ensure(self, device: torch.device) -> torch.Tensor:
        hist = self.hist
        if hist is None:
            hist = self.hist = torch.zeros(self.num_classes, BINS, device=device)
        elif hist.device != device:  # restored from a checkpoint loaded on the CPU
            hist = self.hist = hist.to(device)
        return hist

    def score(self, ranks: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """log(C * pi_y * F_y(r)) per row: (B,) float32, higher = blocked first.

        `ranks`: (B,) float32 batch density ranks in [0, 1]; `labels`: (B,) int64 classes in [0, C);
        `generator`: on the ranks' device, for the draw inside a bin. F_y is the class's histogram,
        the row placed uniformly at random among the class's history in its own bin, shrunk toward
        the uniform distribution (F(r) = r) by PRIOR_ROWS pseudo-rows; pi_y = (n_y + 1) / (n + C), so
        every class counts as balanced before anything is seen."""
        hist = self._ensure(ranks.device)
        rows = hist.index_select(0, labels)  # (B, BINS)
        n_y = rows.sum(dim=1)
        bin_ = (ranks.float() * BINS).long().clamp(0, BINS - 1).unsqueeze(1)
        below = (rows.cumsum(dim=1) - rows).gather(1, bin_).squeeze(1)  # rows of the class in lower bins
        draw = torch.rand(ranks.shape, device=ranks.device, generator=generator)
        inside = rows.gather(1, bin_).squeeze(1) * draw
        percentile = (below + inside + PRIOR_ROWS * ranks) / (n_y + PRIOR_ROWS)
        share = self.num_classes * (n_y + 1) / (hist.sum() + self.num_classes)
        return percentile.clamp_min(1e-6).log() + share.log()

    def batch_counts(
        self, ranks: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """This rank's rows as histogram counts: (C, BINS) float32. `weight`: (B,) 1 for a row that
        counts, 0 for one to leave out (None: every row counts). Sum over ranks, then `add`."""
        hist = self._ensure(ranks.device)
        bin_ = (ranks.float() * BINS).long().clamp(0, BINS - 1)
        weight = torch.ones_like(ranks, dtype=hist.dtype) if weight is None else weight.to(hist.dtype)
        return torch.zeros_like(hist).index_put_((labels, bin_), weight, accumulate=True)

    def add(self, counts: torch.Tensor) -> None:
        """Decay the history by 1 - n / (memory * C), n the rows in `counts` ((C, BINS), summed over
        ranks), and add them. The decay stays a device value: nothing is read back."""
        hist = self._ensure(counts.device)
        keep = (1.0 - counts.sum() / (self.memory * self.num_classes)).clamp_min(0.0)
        self.hist = hist * keep + counts

    def state_dict(self) -> dict:
        return {"hist": None if self.hist is None else self.hist.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.hist = state["hist"]
