"""Recompute mode's ranking pass, as a selection asks for it (`Selector.score_pass`, `Method.score_pass`):
how the shallow part scores the whole batch before the kept rows train. The split model runs it
(models.BlockedModel.resolve_score resolves the automatic parts); the cost model prices it (costs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ScorePass:
    """How recompute mode's ranking pass runs (the training pass of the kept rows never changes).

    `scale`: the batch is resized by this factor (area averaging) before the shallow part ranks
    it: the pass costs about scale**2 of a full-resolution one for convolutional stems. None
    (auto): AUTO_SCALE where the model's shallow part takes the resized input, else 1.
    `norm`: normalisation statistics of that pass. `batch`: the batch's own, as the training pass
    (the running statistics are left as they were); `running`: the running statistics (eval mode),
    which skips the reductions of train-mode BatchNorm; `auto`: running where the shallow part has
    BatchNorm with running statistics, else batch. `BlockedModel.resolve_score` resolves the autos.
    """

    scale: Optional[float] = 1.0
    norm: str = "batch"

    def exact(self) -> bool:
        return self.scale == 1.0 and self.norm == "batch"

    def resolved(self) -> bool:
        return self.scale is not None and self.norm != "auto"


EXACT_SCORE = ScorePass()
AUTO_SCORE = ScorePass(None, "auto")
# Scale 0: no ranking pass at all, for a selection that reads no features (random blocking): recompute
# mode then runs the whole model on the kept rows only, and `select` gets (B, 0) features.
NO_RANKING = ScorePass(0.0, "batch")
# Half resolution: a quarter of the ranking pass's FLOPs; on Fashion-MNIST (3 seeds) it trained as
# well as the exact pass (docs/RESULTS.md, "The ranking pass").
AUTO_SCALE = 0.5
