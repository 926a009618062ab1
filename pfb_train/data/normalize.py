"""Batches made model input on the training device: float cast, normalisation, memory format.

DataLoader workers on the `cpu` decode path (imagefolder, hf, wds) ship uint8 (N, 3, H, W)
batches, as timm's loader does (`create_transform(..., use_prefetcher=True)`): a quarter of the
bytes of float32 through shared memory, the pinned copy and PCIe. `Normalize` then makes them
float32, normalised and (with `runtime.channels_last`) channels_last, two ops per batch: on CUDA
on the prefetcher's side stream after the copy (prefetch.py), so it overlaps the step; on the CPU
in `NormalizingLoader`, the same code. resident.py uses it for in-memory images. A batch that is
already floating point (device decoding, DALI, float in-memory sets) only takes the memory format:
the loaders are the one place batches get theirs, so the training step takes them as they come.
"""

from __future__ import annotations

from typing import Optional

import torch

from pfb_train.data.wrapped import WrappedLoader


class Normalize:
    """Batch (images, labels, indices, ...) -> the same with images as float32 (N, 3, H, W):
    (pixel / 255 - mean) / std per channel, computed as pixel * scale + shift.

    `mean`, `std`: of [0, 1] pixels, one value per channel, or one for a grey image (then its
    channel is repeated to three); None for batches that come as float already (then only the memory
    format is set). Images with one channel are expanded to three on the way."""

    def __init__(self, mean, std, channels_last: bool = False):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # device -> (scale, shift) there: copied once, on first use
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale: Optional[torch.Tensor] = None
        self.shift: Optional[torch.Tensor] = None
        if mean is None:
            return
        mean = torch.tensor(mean, dtype=torch.float64).expand(3)
        std = torch.tensor(std, dtype=torch.float64).expand(3)
        # Worked out in float64, used in float32: each constant is rounded once.
        self.scale = (1 / (255 * std)).float().view(1, 3, 1, 1)
        self.shift = (-mean / std).float().view(1, 3, 1, 1)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), float32 (1, 3, 1, 1) on `device`."""
        if device not in self._on:
            scale, shift = self.scale, self.shift
            assert scale is not None and shift is not None  # `images` refuses uint8 images without them first
            self._on[device] = (scale.to(device), shift.to(device))
        return self._on[device]

    def __call__(self, batch: tuple) -> tuple:
        images, *rest = batch
        return (self.images(images), *rest)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1 or 3, H, W) -> float32 (N, 3, H, W) on the same device; float: in the memory format
        only. Raises ValueError for uint8 images without a mean and std."""
        if images.is_floating_point():
            if self.memory_format is torch.contiguous_format:
                return images  # as made: no copy
            return images.contiguous(memory_format=self.memory_format)  # a no-op when it is already
        if self.scale is None:
            raise ValueError("uint8 images need a mean and std to be normalised")
        n, _, height, width = images.shape
        scale, shift = self.constants(images.device)
        out = torch.empty(
            (n, 3, height, width), dtype=torch.float32, device=images.device, memory_format=self.memory_format
        )
        out.copy_(images)  # the cast (a grey channel repeated): faster on the CPU than a mixed-dtype addcmul
        return torch.addcmul(shift, out, scale, out=out)


class NormalizingLoader(WrappedLoader):
    """Training on the CPU: wraps a loader of uint8 batches and yields them normalised (`Normalize`)
    on the training thread. On CUDA, DevicePrefetcher applies the same `Normalize` on its side
    stream instead."""

    def __init__(self, loader, normalize: Normalize):
        super().__init__(loader)
        self.normalize = normalize

    def __iter__(self):
        for batch in self.loader:
            yield self.normalize(batch)
