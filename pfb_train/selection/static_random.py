"""Static random pruning: one fixed random subset of the data, the same every epoch (a baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pfb_train.selection.base import Selector, need
from pfb_train.selection.registry import Method, register
from pfb_train.seeding import derive_seed


class StaticRandomSelector(Selector):
    """Train on one fixed random subset of (1 - drop_fraction) of the data, every epoch."""

    name = "static_random"

    def __init__(self, drop_fraction: float, seed: int = 0):
        super().__init__(seed)
        self.drop_fraction, self.shared_seed = drop_fraction, seed

    def epoch_indices(self, num_samples: int):
        if self.drop_fraction == 0:
            return None
        order = torch.randperm(
            num_samples, generator=torch.Generator().manual_seed(derive_seed("static subset", self.shared_seed))
        )
        return order[: self.fewest_samples(num_samples)].sort().values

    def fewest_samples(self, num_samples: int) -> int:
        return num_samples - round(self.drop_fraction * num_samples)  # every epoch's subset: exact


@dataclass
class StaticRandomOptions:
    drop_fraction: float = 0.4  # of the training set, left out of every epoch

    def check(self, run, key) -> None:
        need(
            0.0 <= self.drop_fraction < 1.0,
            f"config key '{key('drop_fraction')}' must be in [0, 1), got {self.drop_fraction}",
        )


register(
    Method(
        "static_random",
        level="sampler",
        options=StaticRandomOptions,
        ratio_option="drop_fraction",
        build=lambda o, run: StaticRandomSelector(o.drop_fraction, seed=run.seed),
        summary="one fixed random subset of (1 - drop_fraction) of the data, every epoch",
    )
)
