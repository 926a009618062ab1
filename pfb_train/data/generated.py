"""In-memory sets that need no files: `synthetic` (class-dependent smooth patterns plus noise, made from
a seed) and `digits` (scikit-learn's bundled 8x8 handwritten digits, upsampled, fixed split)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pfb_train.data.encoded import pixel_split
from pfb_train.data.registry import DataSource, register
from pfb_train.data.splits import DataSplits
from pfb_train.errors import UserError


def synthetic(num_classes: int, img_size: int, train_samples: int, val_samples: int, seed: int = 0) -> DataSplits:
    """Each class is a fixed smooth random pattern; samples add pixel noise and a brightness shift.
    Items: float32 (3, img_size, img_size), model input as they are."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=gen)
    prototypes = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)

    def draw(n: int) -> TensorDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, 3, img_size, img_size, generator=gen)
        shift = 0.3 * torch.randn(n, 1, 1, 1, generator=gen)
        return TensorDataset(prototypes[labels] + noise + shift, labels)

    return DataSplits(draw(train_samples), draw(val_samples), num_classes)


def load_digits(val_fraction: float = 0.2):
    """scikit-learn's 1,797 digit images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64, and the fixed
    (seed 0) train and validation indices. Raises UserError when scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits as load  # scikit-learn is optional: only this source needs it
    except ImportError:
        raise UserError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = int(round(val_fraction * len(labels)))
    return images, labels, order[n_val:], order[:n_val]


def digits(img_size: int) -> DataSplits:
    """The digits upsampled to img_size, float32 (3, img_size, img_size) normalised to [-1, 1]; the split
    is fixed whatever the run's seed."""
    images, labels, train, val = load_digits()
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    train_set, val_set = TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])
    return DataSplits(train_set, val_set, 10, input_stats=((0.5,), (0.5,)))


def encode_digits(d) -> tuple[list, int]:
    """8x8 images of 17 grey levels, written at their own size."""
    images, labels, *split = load_digits()
    pixels = (images * 255).round().to(torch.uint8).numpy()
    names = (d.train_split, d.val_split)
    return [pixel_split(pixels[index], labels[index].numpy(), name) for index, name in zip(split, names)], 10


register(
    DataSource(
        "synthetic",
        # made at the requested size, so there is nothing to subsample
        build=lambda d, num_classes, seed: synthetic(
            num_classes or 10, d.img_size, d.train_samples or 2048, d.val_samples or 512, seed=seed
        ),
        summary="class-dependent smooth random patterns plus noise, made from the run seed (no files); "
        "data.train_samples / val_samples are its size (2048 / 512), model.num_classes its classes (10)",
        samples="size",
        imbalance=False,
        options=("train_samples", "val_samples"),
    )
)

register(
    DataSource(
        "digits",
        build=lambda d, num_classes, seed: digits(d.img_size),
        summary="scikit-learn's 1,797 8x8 handwritten digits, upsampled to data.img_size; a fixed 80/20 split",
        options=("train_samples", "val_samples", "imbalance"),
        encode=encode_digits,
    )
)
