"""The input pipeline: data sources (one registered unit each), samplers and loaders, device decoding,
prefetching.

Importing this package registers the built-in sources; plug-ins register through the
`pfb_train.datasets` entry point group (registry.py)."""

# Importing a source's module registers it; this order is the order `sources()` lists them in.
from pfb_train.data import generated, fashion, cifar, folder, hf, wds  # noqa: F401, I001
from pfb_train.data.datasets import build_datasets
from pfb_train.data.fashion import FASHION_MNIST_FILES, read_idx
from pfb_train.data.generated import digits, synthetic
from pfb_train.data.loaders import TrainSampler, build_loaders, set_loader_epoch
from pfb_train.data.registry import DataSource, get_source, register, sources, unregister
from pfb_train.data.splits import DataSplits
from pfb_train.data.subsets import class_subset, dataset_labels, long_tailed_counts, stratified_counts

__all__ = [
    "FASHION_MNIST_FILES",
    "DataSource",
    "DataSplits",
    "TrainSampler",
    "build_datasets",
    "build_loaders",
    "class_subset",
    "dataset_labels",
    "digits",
    "get_source",
    "long_tailed_counts",
    "read_idx",
    "register",
    "set_loader_epoch",
    "sources",
    "stratified_counts",
    "synthetic",
    "unregister",
]
