"""Full data: every sample takes the whole forward and backward pass."""

from dataclasses import dataclass

from pfb_train.selection.base import Selector
from pfb_train.selection.registry import Method, register


class NoSelector(Selector):
    name = "none"


@dataclass
class NoOptions:
    """Full data has no options."""


register(
    Method(
        "none",
        level="none",
        options=NoOptions,
        build=lambda o, run: NoSelector(run.seed),
        summary="full data: every sample takes the whole forward and backward pass",
    )
)
