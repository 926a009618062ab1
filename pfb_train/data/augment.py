"""Pad-crop-flip augmentation of small in-memory images (CIFAR, Fashion-MNIST): one rule, two forms.

`ImageRecipe.item_transform` is the per-item form (torchvision v2, run by DataLoader workers);
`pad_crop_flip` is the same rule for a whole batch, one gather on the training device
(resident.py). Train: zero padding of `padding` px on every side, a size x size crop at an
integer offset drawn uniformly from 0..2*padding in each direction, a horizontal flip with
probability 1/2 (torchvision's RandomCrop(size, padding) and RandomHorizontalFlip). The
batched form takes each sample's offsets and flip from its seed (`pad_crop_draws`, draws.py), so
a sample's pixels do not depend on its batch, the worker count or a resume inside the epoch.
Stored images of another size are resized once (`resize_images`), as the per-item form
resizes each image before its crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pfb_train.data.draws import sample_uniforms


@dataclass(frozen=True)
class ImageRecipe:
    """How stored uint8 images become model input: resized to `size`, padded-cropped and flipped
    (train), scaled to [0, 1] and normalised by `mean` / `std` (one value per stored channel),
    a grey channel repeated to three."""

    size: int  # px, the side of the model's input
    padding: int  # px of zero padding on each side before the random crop
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def item_transform(self, train: bool, stored_size: int) -> v2.Compose:
        """The per-item form: (C, H, W) uint8 -> (3, size, size) float32."""
        resize = [v2.Resize(self.size, antialias=True)] if stored_size != self.size else []
        augment = [v2.RandomCrop(self.size, padding=self.padding), v2.RandomHorizontalFlip()] if train else []
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        grey = [v2.Lambda(grey_to_rgb)] if len(self.mean) == 1 else []
        return v2.Compose([*resize, *augment, *finish, *grey])


def grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1, H, W) -> (3, H, W) view: timm models take 3 channels."""
    return image.expand(3, -1, -1)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), each image as `v2.Resize(size, antialias=True)`
    makes it (on the CPU: its uint8 kernel, the workers' pixels exactly)."""
    return TF.resize(images, [size], antialias=True)


def pad_crop_draws(seeds: torch.Tensor, padding: int) -> torch.Tensor:
    """(n, 3) int64 rows (top, left, flip) of the samples with these seeds (int64, (n,)): offsets in
    the padded image, uniform on 0..2*padding; flip 1 with probability 1/2."""
    u = sample_uniforms(seeds, 3)
    offsets = (u[:, :2] * (2 * padding + 1)).floor().clamp_(max=2 * padding)  # the product may round up
    return torch.cat([offsets, (u[:, 2:] < 0.5).double()], dim=1).long()


def pad_crop_flip(images: torch.Tensor, index: torch.Tensor, draws: torch.Tensor, padding: int) -> torch.Tensor:
    """The augmented batch, uint8 (n, C, H, W), gathered from `images` (uint8 (N, C, H, W)) at
    `index` ((n,) int64) with `draws` ((n, 3) rows of top, left, flip; pad_crop_draws), all on one device.

    Output pixel (r, c) of sample i is stored pixel (top - padding + r, left - padding + c'), c' = c
    or, flipped, W - 1 - c; zero outside the image. One gather and one select: no padded copy, no
    data-dependent shapes, so nothing waits for the device."""
    _, _, height, width = images.shape
    top, left, flip = draws.unbind(1)
    rows = top[:, None] - padding + torch.arange(height, device=images.device)  # (n, H)
    across = torch.arange(width, device=images.device)
    cols = left[:, None] - padding + torch.where(flip[:, None].bool(), width - 1 - across, across)  # (n, W)
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    # Advanced indices around a slice: the result is (n, H, W, C); as (n, C, H, W) it is channels_last.
    picked = images[
        index[:, None, None], :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
    ]
    picked = torch.where(inside[..., None], picked, torch.zeros((), dtype=images.dtype, device=images.device))
    return picked.permute(0, 3, 1, 2)
