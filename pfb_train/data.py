"""Datasets and loaders. Every batch is (images, labels, dataset indices of its samples).

- `synthetic`: class-dependent smooth patterns plus noise, made from a seed (learnable, no files).
- `digits`: scikit-learn's bundled 8x8 handwritten digits (real images), upsampled, fixed split.
- `imagefolder`: ImageNet layout `root/train/<class>/*.JPEG`, `root/val/<class>/*`, timm transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from pfb_train.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class IndexedDataset(Dataset):
    """Wraps a dataset of (image, label) so items are (image, label, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int


def synthetic(num_classes: int, img_size: int, train_samples: int, val_samples: int, seed: int = 0) -> DataSplits:
    """Each class is a fixed smooth random pattern; samples add pixel noise and a brightness shift."""
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


def digits(img_size: int, val_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 1,797 digit images; the split is fixed (seed 0) whatever the run's seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = int(round(val_fraction * len(labels)))
    val, train = order[:n_val], order[n_val:]
    return DataSplits(TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), 10)


def _check_class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise UserError(f"dataset folder not found: {split_dir} (data.root must hold train/ and val/)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"no class folders in {split_dir}")
    for name in classes:
        if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (split_dir / name).iterdir()):
            raise UserError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes


def imagefolder(root: str, img_size: int, auto_augment=None) -> DataSplits:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"data.root does not exist: {base}")
    train_classes = _check_class_folders(base / "train")
    val_classes = _check_class_folders(base / "val")
    if val_classes != train_classes:
        missing = sorted(set(train_classes) ^ set(val_classes))[:5]
        raise UserError(f"train/ and val/ in {base} have different class folders (e.g. {', '.join(missing)})")
    train_tf = create_transform(img_size, is_training=True, auto_augment=auto_augment)
    val_tf = create_transform(img_size, is_training=False)
    train = ImageFolder(str(base / "train"), transform=train_tf)
    val = ImageFolder(str(base / "val"), transform=val_tf)
    return DataSplits(train, val, len(train_classes))


def build_datasets(data_cfg, num_classes=None, seed: int = 0) -> DataSplits:
    d = data_cfg
    if d.dataset == "synthetic":
        splits = synthetic(num_classes or 10, d.img_size, d.train_samples, d.val_samples, seed=seed)
    elif d.dataset == "digits":
        splits = digits(d.img_size)
    else:
        splits = imagefolder(d.root, d.img_size, d.auto_augment)
    if num_classes is not None and num_classes != splits.num_classes:
        raise UserError(f"config key 'model.num_classes' is {num_classes} but dataset '{d.dataset}' has {splits.num_classes} classes")
    return splits


class ShardedEvalSampler(Sampler):
    """Rank r visits indices r, r+W, r+2W, ...: every sample exactly once over all ranks (no padding)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(splits: DataSplits, data_cfg, seed: int, rank: int = 0, world_size: int = 1, pin_memory=False):
    """Train loader: shuffled per epoch (call `loader.sampler.set_epoch`), fixed batch size (drop_last)."""
    d = data_cfg
    if len(splits.train) < d.batch_size * world_size:
        raise UserError(
            f"training set has {len(splits.train)} samples, fewer than one global batch "
            f"(data.batch_size {d.batch_size} x {world_size} processes)"
        )
    train_sampler = DistributedSampler(splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    common = dict(num_workers=d.workers, pin_memory=pin_memory, persistent_workers=d.workers > 0)
    train = DataLoader(IndexedDataset(splits.train), batch_size=d.batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(
        IndexedDataset(splits.val),
        batch_size=d.eval_batch_size or d.batch_size,
        sampler=ShardedEvalSampler(len(splits.val), rank, world_size),
        **common,
    )
    return train, val
