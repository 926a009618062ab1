"""The cost model of a blocked step, and FLOP counts that check it.

Per-sample training cost in forward units: forward 1, backward 2. With shallow share s of
the forward FLOPs and blocked fraction p, relative to full data (3 units):
  reuse      3s + 3(1-p)(1-s)     shallow forward and backward on every row
  recompute  s + 3(1-p)           no-grad shallow pass on every row, full model on kept rows
  ideal      s + 2s(1-p) + 3(1-p)(1-s)   shallow backward for kept rows only (the limit)
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

MODES = ("reuse", "recompute", "ideal")


def predicted_cost_ratio(mode: str, shallow_share: float, ratio: float) -> float:
    s, p = shallow_share, ratio
    cost = {
        "reuse": 3 * s + 3 * (1 - p) * (1 - s),
        "recompute": s + 3 * (1 - p),
        "ideal": s + 2 * s * (1 - p) + 3 * (1 - p) * (1 - s),
    }[mode]
    return cost / 3.0


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


def step_flops(blocked, x: torch.Tensor, kept: int | None) -> int:
    """FLOPs of one training step's forward and backward; `kept` rows continue past the split (None: all)."""
    keep = None if kept is None else torch.arange(kept, device=x.device)
    select = None if kept is None else (lambda feats: keep)
    return count_flops(lambda: blocked(x, select=select).logits.float().sum().backward())


def cheaper_mode(ratio: float) -> str:
    """recompute - reuse = s(3p - 1)/3 in the cost model: recompute wins exactly when p > 1/3,
    whatever the shallow share s (it trades the blocked rows' shallow backward, 2sp, for a
    second shallow forward of the kept rows, s(1 - p))."""
    return "recompute" if ratio > 1 / 3 else "reuse"


def blocking_mode(blocking) -> str:
    """Resolve `blocking.mode`; `auto` is the cheaper mode at the fraction of each batch the method
    blocks (methods that block no rows run the plain model: `reuse` costs nothing there)."""
    if blocking.mode != "auto":
        return blocking.mode
    from pfb_train.selection import get_method

    fraction = get_method(blocking.method).blocked_per_batch(blocking.chosen())
    return cheaper_mode(fraction) if fraction > 0 else "reuse"
