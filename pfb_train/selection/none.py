"""Full data: every sample takes the whole forward and backward pass."""

from pfb_train.selection.base import Selector


class NoSelector(Selector):
    name = "none"
