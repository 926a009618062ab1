"""Fixed subsets of in-memory datasets: `data.train_samples` / `data.val_samples` (class-stratified,
seed 0) and `data.imbalance` (a long-tailed training set), for sources whose `samples` is `subset`."""

from __future__ import annotations

import dataclasses
from typing import Optional, cast

import torch
from torch.utils.data import TensorDataset
from torchvision.datasets import ImageFolder

from pfb_train.data.splits import DataSplits, SizedDataset, TensorImages
from pfb_train.errors import UserError


def dataset_labels(dataset: SizedDataset):
    """(N,) int64 class of every sample, when the dataset keeps its labels in memory; else None."""
    if isinstance(dataset, TensorImages):
        return dataset.labels
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, ImageFolder):
        return torch.tensor(dataset.targets, dtype=torch.long)
    if hasattr(dataset, "labels"):  # hf: one column read
        return dataset.labels()
    return None


def _take(dataset: SizedDataset, index: torch.Tensor) -> SizedDataset:
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[index], dataset.labels[index], dataset.recipe, dataset.train)
    tensors = cast(TensorDataset, dataset).tensors  # the other in-memory sets (sources whose samples is 'subset')
    return TensorDataset(*(t[index] for t in tensors))


def class_subset(labels: torch.Tensor, counts: list[int], seed: int = 0) -> torch.Tensor:
    """Indices of `counts[c]` samples of each class c, drawn by a fixed seed, in dataset order."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in enumerate(counts):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.cat(chosen).sort().values


def stratified_counts(labels: torch.Tensor, num_classes: int, total: int, key: str) -> list[int]:
    """`total` samples spread over the classes in proportion to their share of the data; a UserError
    naming config `key` if the split has fewer."""
    available = torch.bincount(labels, minlength=num_classes)
    if total > len(labels):
        raise UserError(f"config key '{key}' is {total}, but the split has {len(labels)} samples")
    counts = (available.double() * total / len(labels)).floor().long()
    for c in torch.argsort(available, descending=True, stable=True)[: total - int(counts.sum())]:
        counts[c] += 1  # the remainder, one each to the largest classes
    return counts.tolist()


def long_tailed_counts(counts: list[int], imbalance: float) -> list[int]:
    """The usual long-tailed profile: class c keeps counts[c] * imbalance^(c / (C-1)); class 0 is the
    head, the last class keeps `imbalance` of its samples."""
    last = max(len(counts) - 1, 1)
    return [max(1, round(n * imbalance ** (c / last))) for c, n in enumerate(counts)]


def rare_class_counts(counts: list[int], imbalance: float, rare: list[int]) -> list[int]:
    """A step profile: the classes in `rare` keep counts[c] * imbalance of their samples, the others
    all. Raises UserError for a class outside [0, C)."""
    bad = [c for c in rare if not 0 <= c < len(counts)]
    if bad:
        raise UserError(
            f"config key 'data.rare_classes' names {bad}, not classes of a {len(counts)}-class set "
            f"(0 to {len(counts) - 1})"
        )
    return [max(1, round(n * imbalance)) if c in rare else n for c, n in enumerate(counts)]


def subsample(
    splits: DataSplits, train_samples, val_samples, imbalance: float, rare_classes: Optional[list[int]] = None
) -> DataSplits:
    """Fixed (seed 0) class-stratified subsets, and a long-tailed training set when imbalance < 1:
    the exponential profile (`long_tailed_counts`), or with `rare_classes` a step (`rare_class_counts`)."""
    train, val = splits.train, splits.val
    if train_samples is not None or imbalance < 1.0:
        labels = dataset_labels(train)
        counts = stratified_counts(labels, splits.num_classes, train_samples or len(labels), "data.train_samples")
        counts = (
            long_tailed_counts(counts, imbalance)
            if rare_classes is None
            else rare_class_counts(counts, imbalance, rare_classes)
        )
        train = _take(train, class_subset(labels, counts))
    if val_samples is not None:
        labels = dataset_labels(val)
        val = _take(
            val, class_subset(labels, stratified_counts(labels, splits.num_classes, val_samples, "data.val_samples"))
        )
    return dataclasses.replace(splits, train=train, val=val)
