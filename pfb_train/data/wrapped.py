"""Base of the loaders that wrap a DataLoader (device decoding, prefetching).

The engine and `set_loader_epoch` use a loader's `sampler`, `generator`, `batch_size` and
length (resident.py also `drop_last`); a wrapper passes them through, so wrappers nest and the
training loop never knows.
"""

from __future__ import annotations


class WrappedLoader:
    def __init__(self, loader):
        self.loader = loader

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def generator(self):
        return self.loader.generator

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def drop_last(self) -> bool:
        return self.loader.drop_last

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)
