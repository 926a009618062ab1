"""The input pipeline: datasets, samplers and loaders, device decoding, prefetching."""

from pfb_train.data.datasets import (
    FASHION_MNIST_FILES,
    DataSplits,
    build_datasets,
    class_subset,
    dataset_labels,
    digits,
    long_tailed_counts,
    read_idx,
    stratified_counts,
    synthetic,
)
from pfb_train.data.loaders import ShardedTrainSampler, build_loaders, set_loader_epoch

__all__ = ["FASHION_MNIST_FILES", "DataSplits", "ShardedTrainSampler", "build_datasets", "build_loaders",
           "class_subset", "dataset_labels", "digits", "long_tailed_counts", "read_idx", "set_loader_epoch",
           "stratified_counts", "synthetic"]
