"""InfoBatch (Qin et al., ICLR 2024): prune well-learned samples at the sampler, rescale the rest.

Score of a sample = its latest unreduced loss (3.0 before it is first seen). Each epoch the
samples scoring below the mean are candidates; a random `prune_ratio` of the candidates is
skipped for the epoch and the kept candidates' losses are multiplied by 1 / (1 - prune_ratio).
The last (1 - delta) of the epochs use full data (annealing). `prune_ratio` is a fraction of
the candidates, not of the data: the harness reports the realised fraction skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pfb_train.distributed import all_gather_cat
from pfb_train.selection.base import Selector, need
from pfb_train.selection.registry import Method, RunFacts, register
from pfb_train.seeding import derive_seed

INITIAL_SCORE = 3.0


class InfoBatchSelector(Selector):
    name = "infobatch"

    def __init__(self, prune_ratio: float, epochs: int, delta: float = 0.875, seed: int = 0):
        super().__init__(seed)
        self.prune_ratio, self.delta, self.epochs = prune_ratio, delta, epochs
        self.shared_seed = seed  # the subset must be the same on every rank: no rank in this seed
        self.scores: Optional[torch.Tensor] = None  # (N,) latest loss per sample, on the training device
        self.weights: Optional[torch.Tensor] = None  # (N,) loss multiplier for this epoch

    def pruning(self, position: float) -> bool:
        """Whether the epoch starting at `position` (schedule epochs, Selector.set_epoch) prunes."""
        return self.prune_ratio > 0 and position < self.delta * self.epochs

    def epoch_indices(self, num_samples: int):
        scores = self.scores
        if scores is None:
            scores = self.scores = torch.full((num_samples,), INITIAL_SCORE)
        weights = self.weights = torch.ones_like(scores)
        if not self.pruning(self.position):
            return None
        candidates = (scores < scores.mean()).nonzero().flatten()  # once per epoch: sync is fine
        gen = torch.Generator().manual_seed(derive_seed("infobatch", self.shared_seed, self.epoch))
        skip = (torch.rand(len(candidates), generator=gen) < self.prune_ratio).to(candidates.device)
        weights[candidates[~skip]] = 1.0 / (1.0 - self.prune_ratio)
        if not skip.any():
            return None
        keep = torch.ones(num_samples, dtype=torch.bool)
        keep[candidates[skip].cpu()] = False
        return keep.nonzero().flatten()

    def fewest_samples(self, num_samples: int) -> int:
        """The expected subset when every sample but one scores below the mean (its most pruned epoch):
        prune_ratio of num_samples - 1 candidates skipped."""
        return num_samples - round(self.prune_ratio * (num_samples - 1)) if self.prune_ratio > 0 else num_samples

    def loss_weights(self, indices):
        if not self.pruning(self.position):
            return None
        if self.weights.device != indices.device:
            self.weights = self.weights.to(indices.device)  # once per epoch
        return self.weights[indices]

    def observe(self, feats, keep, indices, losses, labels=None) -> None:
        """Every rank records every rank's losses, so the scores stay identical across ranks."""
        indices, values = all_gather_cat(indices), all_gather_cat(losses.float())
        scores = self.scores
        assert scores is not None  # created by epoch_indices, before the epoch's first step
        if scores.device != values.device:
            scores = self.scores = scores.to(values.device)
        # Stand-ins of unreadable files (index < 0) write to a spare slot past the end, then dropped:
        # filtering them out instead would make the host wait for the device.
        n = scores.shape[0]
        slots = torch.cat([scores, scores.new_zeros(1)])
        slots[torch.where(indices >= 0, indices, n)] = values
        self.scores = slots[:n]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": self.scores, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scores, self.weights = state["scores"], state["weights"]


@dataclass
class InfoBatchOptions:
    prune_ratio: float = 0.4  # fraction of the below-mean-loss candidates skipped each epoch (InfoBatch's r)
    delta: float = 0.875  # prune during the first delta of the epochs, then full data

    def check(self, run, key) -> None:
        need(
            0.0 <= self.prune_ratio < 1.0,
            f"config key '{key('prune_ratio')}' must be in [0, 1), got {self.prune_ratio}",
        )
        need(0.0 < self.delta <= 1.0, f"config key '{key('delta')}' must be in (0, 1], got {self.delta}")
        need(
            run.epochs is not None, "method 'infobatch' needs the run's number of epochs (its delta is a share of them)"
        )


def build(o: InfoBatchOptions, run: RunFacts) -> InfoBatchSelector:
    assert run.epochs is not None  # InfoBatchOptions.check refuses a run without
    return InfoBatchSelector(o.prune_ratio, epochs=run.epochs, delta=o.delta, seed=run.seed)


register(
    Method(
        "infobatch",
        level="sampler",
        options=InfoBatchOptions,
        ratio_option="prune_ratio",
        build=build,
        summary="well-learned samples (loss below the mean) are skipped at the sampler and the rest reweighted (ICLR 2024)",
    )
)
