"""A run's datasets from its `data` config: the registered source's splits (registry.py), the fixed
subsets where the source takes them (subsets.py), and the class count checked against the model's."""

from __future__ import annotations

from typing import Optional

from pfb_train.data.registry import get_source
from pfb_train.data.splits import DataSplits
from pfb_train.data.subsets import subsample
from pfb_train.errors import UserError


def build_datasets(data_cfg, num_classes: Optional[int] = None, seed: int = 0) -> DataSplits:
    """The train and validation splits `data_cfg.dataset` names. `num_classes` is model.num_classes
    (None: the source's count), `seed` the run seed. Raises a one-line UserError for an unknown
    source, for data the source cannot read, or when the source's class count is not `num_classes`."""
    d = data_cfg
    source = get_source(d.dataset)
    splits = source.build(d, num_classes, seed)
    if source.samples == "subset":
        splits = subsample(splits, d.train_samples, d.val_samples, d.imbalance, d.rare_classes)
    if num_classes is not None and num_classes != splits.num_classes:
        raise UserError(
            f"config key 'model.num_classes' is {num_classes} but dataset '{d.dataset}' has "
            f"{splits.num_classes} classes: set model.num_classes=null to take the data set's"
        )
    return splits
