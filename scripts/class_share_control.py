"""The control for `blocking.pfb.stratify: percentile`: the same selection with the density taken out.

`class_share_random` is PFB's class-history selection (percentile.py) fed random scores instead of
densities: every row's class percentile is then a uniform draw, and only the class-share term
log(C * pi_y) is left. It blocks about as many rows of each class as `percentile` does, at random
within the class: what `percentile` gains over it is the density's, what this gains over random
blocking is the class rebalancing's. Registered here, outside the package, through the methods'
plug-in interface; it takes PFB's options (`blocking.class_share_random.*`). Arguments are
`pfb-train`'s:

    python scripts/class_share_control.py --config fashion_mnist --set blocking.method=class_share_random \
        --set blocking.class_share_random.stratify=percentile --set blocking.class_share_random.ratio=0.5 ...
"""

from __future__ import annotations

import sys

import torch

from pfb_train import cli
from pfb_train.selection import Method, register
from pfb_train.selection.pfb import PFBOptions, PFBSelector, build


class ClassShareRandom(PFBSelector):
    """PFB whose density is a uniform draw per row (from the selector's own seeded stream)."""

    name = "class_share_random"

    def density(self, v: torch.Tensor, labels=None) -> torch.Tensor:
        return torch.rand(v.shape[0], device=v.device, generator=self.generator(v.device))


def build_control(options: PFBOptions, run) -> ClassShareRandom:
    selector = build(options, run)
    selector.__class__ = ClassShareRandom  # the same state and options; only the density differs
    return selector


if __name__ == "__main__":
    register(
        Method(
            "class_share_random",
            level="batch",
            options=PFBOptions,
            build=build_control,
            ratio_option="ratio",
            summary="control: PFB's class-history selection on random scores (the class-share term alone)",
        )
    )
    sys.exit(cli.main())
