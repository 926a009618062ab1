"""Block a uniformly random subset of each batch: the control that isolates the density criterion."""

from __future__ import annotations

import torch

from pfb_train.selection.score_pass import NO_RANKING, ScorePass
from pfb_train.selection.base import BlockingSchedule, Selector, WindowOptions
from pfb_train.selection.registry import Method, register


class RandomSelector(Selector):
    name = "random"

    def __init__(self, schedule: BlockingSchedule, seed: int = 0):
        super().__init__(seed)
        self.schedule = schedule

    def blocks_rows(self) -> bool:
        return self.schedule.ratio_at(self.position) > 0

    def score_pass(self) -> ScorePass:
        return NO_RANKING  # the draw reads no features: recompute mode runs the kept rows alone

    def select(self, feats: torch.Tensor, labels=None):
        batch = feats.shape[0]
        k = self.schedule.kept(batch, self.position)
        if k == batch:
            return None
        order = torch.randperm(batch, device=feats.device, generator=self.generator(feats.device))
        return order[:k].sort().values


register(
    Method(
        "random",
        level="batch",
        options=WindowOptions,
        ratio_option="ratio",
        reads_features=False,
        build=lambda o, run: RandomSelector(o.schedule(run.epochs), seed=run.seed),
        summary="a uniformly random `ratio` of each batch is blocked (the control for pfb)",
    )
)
