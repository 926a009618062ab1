"""InfoBatch (Qin et al., ICLR 2024): prune well-learned samples at the sampler, rescale the rest.

Score of a sample = its latest unreduced loss (3.0 before it is first seen). Each epoch the
samples scoring below the mean are candidates; a random `ratio` of the candidates is
skipped for the epoch and the kept candidates' losses are multiplied by 1 / (1 - ratio).
The last (1 - delta) of the epochs use full data (annealing). `ratio` is a fraction of the
candidates, not of the data: the harness reports the realised fraction skipped.
"""

from __future__ import annotations

import torch

from pfb_train.distributed import all_gather_cat
from pfb_train.selection.base import Selector

INITIAL_SCORE = 3.0


class InfoBatchSelector(Selector):
    name = "infobatch"

    def __init__(self, ratio: float, epochs: int, delta: float = 0.875, seed: int = 0):
        super().__init__(seed)
        self.ratio, self.delta, self.epochs = ratio, delta, epochs
        self.shared_seed = seed  # the subset must be the same on every rank: no rank in this seed
        self.scores = None  # (N,) latest loss per sample, on the training device
        self.weights = None  # (N,) loss multiplier for this epoch

    def pruning(self, epoch: int) -> bool:
        return self.ratio > 0 and epoch < self.delta * self.epochs

    def epoch_indices(self, num_samples: int):
        if self.scores is None:
            self.scores = torch.full((num_samples,), INITIAL_SCORE)
        self.weights = torch.ones_like(self.scores)
        if not self.pruning(self.epoch):
            return None
        candidates = (self.scores < self.scores.mean()).nonzero().flatten()  # once per epoch: sync is fine
        gen = torch.Generator().manual_seed(self.shared_seed * 10_007 + self.epoch)
        skip = (torch.rand(len(candidates), generator=gen) < self.ratio).to(candidates.device)
        self.weights[candidates[~skip]] = 1.0 / (1.0 - self.ratio)
        if not skip.any():
            return None
        keep = torch.ones(num_samples, dtype=torch.bool)
        keep[candidates[skip].cpu()] = False
        return keep.nonzero().flatten()

    def loss_weights(self, sample_idx):
        if not self.pruning(self.epoch):
            return None
        if self.weights.device != sample_idx.device:
            self.weights = self.weights.to(sample_idx.device)  # once per epoch
        return self.weights[sample_idx]

    def observe(self, feats, keep, sample_idx, losses) -> None:
        """Every rank records every rank's losses, so the scores stay identical across ranks."""
        idx, values = all_gather_cat(sample_idx), all_gather_cat(losses.float())
        if self.scores.device != values.device:
            self.scores = self.scores.to(values.device)
        self.scores[idx] = values

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": self.scores, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scores, self.weights = state["scores"], state["weights"]


class StaticRandomSelector(Selector):
    """Train on one fixed random subset of (1 - ratio) of the data, every epoch."""

    name = "static_random"

    def __init__(self, ratio: float, seed: int = 0):
        super().__init__(seed)
        self.ratio, self.shared_seed = ratio, seed

    def epoch_indices(self, num_samples: int):
        if self.ratio == 0:
            return None
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.shared_seed))
        return order[: num_samples - round(self.ratio * num_samples)].sort().values
