"""The cost model of a blocked step, and FLOP counts that check it.

Per-sample training cost in forward units: forward 1, backward 2. With shallow share s of
the forward FLOPs and blocked fraction p, relative to full data (3 units):
  reuse      3s + 3(1-p)(1-s)     shallow forward and backward on every row
  recompute  s q^2 + 3(1-p)       no-grad ranking pass on every row at q times the resolution
                                  (blocking.pfb.score_scale; q = 1 by default), full model on kept rows
  ideal      s + 2s(1-p) + 3(1-p)(1-s)   shallow backward for kept rows only (the limit)
The q^2 is exact for convolutions when the sizes divide evenly (resnet50 at 224 px and q = 0.5).

On a GPU, FLOPs misweigh the parts (memory-bound normalisation kernels make the full-resolution
shallow part cost far more than its FLOP share): `pfb_train.calibrate` times a blocked step in
each mode on the device instead (`PartTimes`, `predicted_time_ratio`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pfb_train.selection.score_pass import AUTO_SCALE
from pfb_train.selection import get_method

MODES = ("reuse", "recompute", "ideal")


def predicted_cost_ratio(mode: str, shallow_share: float, ratio: float, score_scale: float = 1.0) -> float:
    """Cost of a blocked step over a full step (a fraction) by FLOPs: `shallow_share` s of the forward
    FLOPs, `ratio` p of each batch blocked, recompute's ranking pass at `score_scale` q (module docstring)."""
    s, p, q = shallow_share, ratio, score_scale
    cost = {
        "reuse": 3 * s + 3 * (1 - p) * (1 - s),
        "recompute": s * q * q + 3 * (1 - p),
        "ideal": s + 2 * s * (1 - p) + 3 * (1 - p) * (1 - s),
    }[mode]
    return cost / 3.0


@dataclass(frozen=True)
class PartTimes:
    """Measured seconds of one batch (B rows) on the device, forward + backward unless said otherwise."""

    full: float  # the whole model, every row
    reuse: float  # a blocked step in reuse mode: shallow on every row, deep on the kept ones
    recompute: float  # a blocked step in recompute mode: the ranking pass, then the whole model on the kept rows
    shallow: float  # the shallow part alone, every row (its share of `full` is what the FLOP model misweighs)
    score: float  # recompute's ranking pass alone (forward, no gradients)

    @property
    def shallow_share(self) -> float:
        return self.shallow / self.full


@dataclass(frozen=True)
class StepCost:
    """The cost model applied to one step's realised rows: what `schedule.budget` and each epoch record's
    `compute` count. A step of B rows of which k go on past the split costs, in full-data steps (3B forward
    units: forward 1, backward 2, as `predicted_cost_ratio`):
      the plain model (no selection ran)   1
      reuse                                s + (1 - s) k/B
      recompute                            s q^2/3 + k/B
    with `shallow_share` s (FLOPs) and recompute's ranking pass at `score_scale` q. A sampler-level method
    trains on fewer rows: its epochs simply have fewer steps."""

    mode: str = "reuse"  # the run's blocking.mode, resolved
    shallow_share: float = 0.0
    score_scale: float = 1.0

    def __call__(self, rows: int, kept: int, split: bool) -> float:
        """Full-data steps of one step of `rows` rows, `kept` of them through the deep part; `split`: the
        selection ran (else the plain model ran on every row, whatever `kept` says)."""
        if not split:
            return 1.0
        s, q, kept_share = self.shallow_share, self.score_scale, kept / rows
        if self.mode == "recompute":
            return s * q * q / 3 + kept_share
        return s + (1 - s) * kept_share


def predicted_time_ratio(mode: str, times: PartTimes) -> float:
    """Blocked over full step time from measured seconds (`times` were taken at the run's ratio; the
    optimizer step and the selection, the same or small in both modes, are left out)."""
    if mode not in ("reuse", "recompute"):
        raise ValueError(f"unknown mode {mode!r}; choose one of: reuse, recompute")
    return getattr(times, mode) / times.full


def count_flops(fn) -> int:
    """FLOPs of everything `fn` runs (forward and backward), as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def shallow_flop_share(blocked, img_size: int, in_chans: int = 3) -> float:
    """Shallow part's share of the forward FLOPs of one image. Use a model on the meta device to skip the math."""
    device = next(blocked.parameters()).device
    x = torch.empty(1, in_chans, img_size, img_size, device=device)
    was_training = blocked.training
    blocked.eval()  # same FLOPs; train-mode BatchNorm would reject a batch of one
    try:
        with torch.no_grad():
            return count_flops(lambda: blocked.shallow(x)) / count_flops(lambda: blocked.deep(blocked.shallow(x)))
    finally:
        blocked.train(was_training)


def step_flops(blocked, x: torch.Tensor, kept: int | None, score=None) -> int:
    """FLOPs of one training step's forward and backward; `kept` rows continue past the split (None: all);
    `score`: recompute mode's ranking pass (selection.score_pass.ScorePass; None: exact)."""
    keep = None if kept is None else torch.arange(kept, device=x.device)
    select = None if kept is None else (lambda feats: keep)
    extra = {} if score is None else {"score": score}
    return count_flops(lambda: blocked(x, select=select, **extra).logits.float().sum().backward())


def cheaper_mode(blocked_fraction: float, score_scale: float = 1.0) -> str:
    """The cheaper mode when `blocked_fraction` (p) of each batch is blocked and the ranking pass runs at
    `score_scale` (q) of the resolution. recompute - reuse = s(q^2 - 3p)/3 in the cost model: recompute
    wins exactly when p > q^2/3, whatever the shallow share s (it trades the blocked rows' shallow
    backward, 2sp, for a ranking pass s q^2 and a second shallow forward of the kept rows, s(1 - p)).
    q = 1: p > 1/3."""
    return "recompute" if blocked_fraction > score_scale * score_scale / 3 else "reuse"


def timed_cheaper_mode(times: PartTimes) -> str:
    """The mode whose blocked step measured faster (reuse on a tie: it needs no second pass)."""
    return "recompute" if times.recompute < times.reuse else "reuse"


def blocking_mode(blocking) -> str:
    """Resolve `blocking.mode` by FLOPs; `auto` is the cheaper mode at the fraction of each batch the
    method blocks (methods that block no rows run the plain model: `reuse` costs nothing there).
    On a GPU the harness then measures instead (`pfb_train.calibrate.choose_mode`)."""
    if blocking.mode != "auto":
        return blocking.mode
    method, options = get_method(blocking.method), blocking.chosen()
    blocked_fraction = method.blocked_fraction_per_batch(options)
    if blocked_fraction <= 0:
        return "reuse"
    return cheaper_mode(blocked_fraction, provisional_scale(method.score_pass(options)))


def provisional_scale(score) -> float:
    """The ranking pass's scale before the model decides an automatic one (selection.score_pass.ScorePass): the
    automatic value; the harness decides again with the model (calibrate.resolve_mode)."""
    return AUTO_SCALE if score.scale is None else score.scale
