"""In-memory datasets held on the training device and made into batches there: no workers, no copies.

A float32 batch of 256 images at 224 px is 154 MB. Through DataLoader workers it is written
to shared memory, copied again into pinned memory and then over PCIe, every step: on an H200
that held resnet50 (bf16) to 58 % of a plain loop's rate (docs/BENCHMARKS.md). Every
in-memory dataset (synthetic, digits: float tensors; CIFAR, Fashion-MNIST: uint8 images with
per-item transforms in workers) that fits is moved to the device once, uint8 staying uint8
and resized there once when `data.img_size` differs. A batch is then one gather there; for a
training split of images it is augmented in the same gather (augment.pad_crop_flip, each
sample's crop and flip drawn from its seed) and normalised (normalize.Normalize). The
sampler, its order, subsets and resume offsets are the wrapped DataLoader's, so runs see the
same samples in the same order as with workers.

Where: on CUDA whenever the data fits in MAX_FRACTION of the GPU's memory; on the CPU too,
within MAX_FRACTION of RAM: the images are in memory already (at their stored size the "device"
copy is the dataset's own tensor), and a Fashion-MNIST epoch's batches take 3 % of the time of
per-item transforms (docs/BENCHMARKS.md, "In-memory datasets and uint8 batches on the CPU").
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import TensorDataset

from pfb_train.data.augment import pad_crop_draws, pad_crop_flip, resize_images
from pfb_train.data.normalize import Normalize
from pfb_train.data.splits import TensorImages
from pfb_train.data.wrapped import WrappedLoader

MAX_FRACTION = 0.25  # of the device's memory: leave the rest to the model
RESIZE_CHUNK = 4096  # images resized at a time when held: bounds the host memory of the resize


def resident_bytes(dataset) -> int | None:
    """Bytes the dataset takes on the device (images at the model's input size), or None when it
    is not an in-memory dataset."""
    if isinstance(dataset, TensorImages):
        n, channels = dataset.images.shape[:2]
        return n * channels * dataset.recipe.size**2 + dataset.labels.numel() * dataset.labels.element_size()
    if isinstance(dataset, TensorDataset):
        return sum(t.numel() * t.element_size() for t in dataset.tensors)
    return None


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of the device (CUDA: the GPU's; CPU: physical RAM), None for other kinds."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def fits_on_device(dataset, device: torch.device) -> bool:
    """Whether `dataset` is in memory and takes at most MAX_FRACTION of the device's memory there."""
    size = resident_bytes(dataset)
    if size is None:
        return False
    memory = device_memory(device)
    return memory is not None and size <= MAX_FRACTION * memory


def hold(dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of an in-memory dataset on `device`: TensorImages as uint8 (N, C, size, size),
    resized on the CPU a chunk at a time (the per-item transform's kernel, so the same pixels on
    every device); a TensorDataset's tensors as they are."""
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors
        return images.to(device), labels.to(device)
    stored, size = dataset.images, dataset.recipe.size
    if stored.shape[-2:] == (size, size):
        return stored.to(device), dataset.labels.to(device)  # on the CPU: the same tensor, no copy
    images = torch.empty((len(stored), stored.shape[1], size, size), dtype=torch.uint8, device=device)
    for start in range(0, len(stored), RESIZE_CHUNK):
        images[start : start + RESIZE_CHUNK] = resize_images(stored[start : start + RESIZE_CHUNK], size).to(device)
    return images, dataset.labels.to(device)


class ResidentLoader(WrappedLoader):
    """Yields (images, labels, indices) made on the device, in the wrapped DataLoader's order.

    Images: the dataset's float tensors as stored, or, for TensorImages, float32 (n, 3, size, size)
    normalised, padded-cropped and flipped when the split trains; channels_last if asked."""

    def __init__(self, loader, dataset, device: torch.device, channels_last: bool = False):
        super().__init__(loader)
        self.device = torch.device(device)
        self.images, self.labels = hold(dataset, self.device)
        recipe = getattr(dataset, "recipe", None)
        self.padding = recipe.padding if recipe is not None and dataset.train else None  # None: no augmentation
        mean, std = (recipe.mean, recipe.std) if recipe is not None else (None, None)
        self.normalize = Normalize(mean, std, channels_last)

    def __iter__(self):
        # The epoch's order (and draws) in one copy to the device, not one small synchronous copy per
        # batch. Train sampler keys are (index, that sample's seed this epoch); eval keys are indices.
        keys = list(self.loader.sampler)
        order = torch.tensor([k[0] if isinstance(k, tuple) else k for k in keys], dtype=torch.long).to(self.device)
        draws = None
        if self.padding is not None:
            seeds = torch.tensor([k[1] for k in keys], dtype=torch.long)
            draws = pad_crop_draws(seeds, self.padding).to(self.device)
        size = self.loader.batch_size
        end = len(order) - len(order) % size if self.loader.drop_last else len(order)
        for start in range(0, end, size):
            indices = order[start : start + size]
            yield (
                self.batch(indices, None if draws is None else draws[start : start + size]),
                self.labels.index_select(0, indices),
                indices,
            )

    def batch(self, indices: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """The images of samples `indices` ((n,) int64 on the device), augmented by `draws` ((n, 3)) if given."""
        if draws is not None:
            assert self.padding is not None  # draws are made for a padding only (__iter__)
            images = pad_crop_flip(self.images, indices, draws, self.padding)
        else:
            images = self.images.index_select(0, indices)
        return self.normalize.images(images)
