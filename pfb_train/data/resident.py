"""In-memory datasets served from GPU memory: each batch is one gather, no workers, no copies.

A float32 batch of 256 images at 224 px is 154 MB. Through DataLoader workers it is written
to shared memory, copied again into pinned memory and then over PCIe, every step: on an H200
that held resnet50 (bf16) to 58 % of a plain loop's rate (docs/BENCHMARKS.md). A dataset that
is already a tensor (synthetic, digits, Fashion-MNIST) and fits on the device is moved there
once; a batch is then `images[indices]` on the GPU. The sampler, its order, subsets and resume
offsets are the wrapped DataLoader's, so runs see the same samples in the same order as with
workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from pfb_train.data.wrapped import WrappedLoader

MAX_FRACTION = 0.25  # of the device's memory: leave the rest to the model


def fits_on_device(dataset, device: torch.device) -> bool:
    if not isinstance(dataset, TensorDataset) or device.type != "cuda":
        return False
    size = sum(t.numel() * t.element_size() for t in dataset.tensors)
    return size <= MAX_FRACTION * torch.cuda.get_device_properties(device).total_memory


class ResidentLoader(WrappedLoader):
    """Yields (images, labels, indices) gathered on the device, in the wrapped DataLoader's order."""

    def __init__(self, loader, dataset: TensorDataset, device: torch.device):
        super().__init__(loader)
        self.images, self.labels = (t.to(device) for t in dataset.tensors)
        self.device = device

    def __iter__(self):
        # The epoch's order in one copy to the device, not one small (synchronous) copy per batch.
        # Train sampler keys are (index, augmentation seed); these datasets have no augmentation.
        keys = [k[0] if isinstance(k, tuple) else k for k in self.loader.sampler]
        order = torch.tensor(keys, dtype=torch.long).to(self.device)
        size = self.loader.batch_size
        end = len(order) - len(order) % size if self.loader.drop_last else len(order)
        for start in range(0, end, size):
            idx = order[start : start + size]
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx), idx
