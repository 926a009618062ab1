"""Datasets: each builder returns the train and validation splits of one source.

- `synthetic`: class-dependent smooth patterns plus noise, made from a seed (learnable, no files).
- `digits`: scikit-learn's bundled 8x8 handwritten digits (real images), upsampled, fixed split.
- `cifar10`, `cifar100`: torchvision's standard files on disk (downloaded only if `data.download`).
- `fashion_mnist`: the four standard idx files (plain or gzipped), by default where Debian's
  `dataset-fashion-mnist` package puts them.
- `imagefolder`: ImageNet layout `root/train/<class>/*.JPEG`, `root/val/<class>/*`, timm transforms.
- `hf` (data/hf.py): a Hugging Face dataset; `wds` (data/wds.py): WebDataset tar shards.

The file datasets' items are uint8 images (worker_transforms), normalised on the training device
(normalize.py); CIFAR and Fashion-MNIST are uint8 in memory (TensorImages), made into batches on
the device when they fit (resident.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from pfb_train.config import FILE_DATASETS
from pfb_train.data.augment import ImageRecipe
from pfb_train.data.decode import BadImage, decode_rgb
from pfb_train.data.device_decode import read_bytes
from pfb_train.data.missing import skip_or_fail
from pfb_train.errors import UserError

IMAGE_EXTENSIONS = IMG_EXTENSIONS  # what torchvision's ImageFolder lists: the checks below use the same


class CheckedImageFolder(ImageFolder):
    """ImageFolder whose files are decoded by decode.py's rule; an unreadable one (empty, truncated, not an
    image, over the pixel limit) is an `Unreadable` item or, with `fail`, a UserError naming it."""

    def __init__(self, root: str, transform, fail: bool = False):
        super().__init__(root, transform=transform)
        self.fail = fail

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = decode_rgb(path)
        except BadImage as e:
            return skip_or_fail(path, str(e), self.fail)
        return self.transform(image), label  # outside the try: a transform's bug is not a bad file


def decode_stored(data: bytes, label: int, name: str, transform, fail: bool):
    """The item of an image held as encoded bytes (hf, wds): (image, label).

    For the device decoders (`transform` None) the bytes as a uint8 tensor, which they count as
    unreadable when empty; else the transformed image decoded by decode.py's rule, or a stand-in
    (`Unreadable`; with `fail` a UserError naming `name`) when it does not decode."""
    if transform is None:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8), label
    try:
        image = decode_rgb(data or b"")
    except BadImage as e:
        return skip_or_fail(name, str(e), fail)
    return transform(image), label


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    decode_on_device: bool = False  # items are file bytes (data.decode: device or dali)
    notes: tuple = ()  # what the reader found and worked around, printed once at the start (wds)
    # Items are uint8 images (the cpu decode path), normalised on the training device with this mean
    # and std of [0, 1] pixels (normalize.py); None: items are model input already.
    mean: Optional[tuple] = None
    std: Optional[tuple] = None


def worker_transforms(img_size: int, auto_augment=None) -> tuple:
    """timm's train and eval transforms for DataLoader workers (imagefolder, hf, wds), ending in uint8
    (3, H, W) tensors as timm's own loader uses them (`use_prefetcher=True`): a quarter of float32's
    bytes leave the workers; the device normalises them with `imagenet_stats()`."""
    from timm.data import create_transform

    return (create_transform(img_size, is_training=True, auto_augment=auto_augment, use_prefetcher=True),
            create_transform(img_size, is_training=False, use_prefetcher=True))


def imagenet_stats() -> dict:
    """DataSplits' `mean` and `std` for worker_transforms' uint8 items: timm's ImageNet defaults."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


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


def load_digits(val_fraction: float = 0.2):
    """scikit-learn's 1,797 digit images (N, 1, 8, 8) in [0, 1], labels, and the fixed (seed 0) train
    and validation indices."""
    try:
        from sklearn.datasets import load_digits as load
    except ImportError:
        raise UserError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = int(round(val_fraction * len(labels)))
    return images, labels, order[n_val:], order[:n_val]


def digits(img_size: int) -> DataSplits:
    """The digits upsampled to img_size; the split is fixed whatever the run's seed."""
    images, labels, train, val = load_digits()
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return DataSplits(TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), 10)


def _check_no_link_loops(split_dir: Path) -> None:
    """ImageFolder follows symbolic links; a link back up the tree would list the same images again
    and again (until paths grow too long), so a loop is a one-line error instead."""
    seen = set()
    for folder, subfolders, _ in os.walk(split_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"symbolic link loop in the data folder: {folder} leads back to {real}")
        seen.add(real)


def _holds_an_image(folder: Path) -> bool:
    """Whether ImageFolder finds an image for this class: torchvision's rule, any file with an image
    extension in the folder or below it (symbolic links followed). Stops at the first one."""
    return any(has_file_allowed_extension(name, IMAGE_EXTENSIONS)
               for _, _, files in os.walk(folder, followlinks=True) for name in files)


def _check_class_folders(split_dir: Path) -> list[str]:
    """The class folder names of `split_dir`; a one-line UserError if it is missing, has none, or one
    holds no image anywhere below it."""
    if not split_dir.is_dir():
        raise UserError(f"dataset folder not found: {split_dir} (data.root must hold train/ and val/)")
    _check_no_link_loops(split_dir)
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"no class folders in {split_dir}")
    for name in classes:
        if not _holds_an_image(split_dir / name):
            raise UserError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                            "neither directly nor in its subfolders")
    return classes


def folder_classes(base: Path) -> list[str]:
    """The class folder names of an ImageNet-layout root, checked: train/ and val/ hold the same, none empty."""
    if not base.is_dir():
        raise UserError(f"data.root does not exist: {base}")
    train_classes = _check_class_folders(base / "train")
    val_classes = _check_class_folders(base / "val")
    if val_classes != train_classes:
        missing = sorted(set(train_classes) ^ set(val_classes))[:5]
        raise UserError(f"train/ and val/ in {base} have different class folders (e.g. {', '.join(missing)})")
    return train_classes


def imagefolder(root: str, img_size: int, auto_augment=None, fail_on_bad: bool = False,
                decode: str = "cpu") -> DataSplits:
    base = Path(root).expanduser()
    train_classes = folder_classes(base)
    if decode != "cpu":  # device, dali: workers read bytes; DeviceDecodeLoader or DaliLoader decodes and augments
        train, val = (ImageFolder(str(base / split), loader=read_bytes) for split in ("train", "val"))
        return DataSplits(train, val, len(train_classes), decode_on_device=True)
    train_tf, val_tf = worker_transforms(img_size, auto_augment)
    train = CheckedImageFolder(str(base / "train"), train_tf, fail_on_bad)
    val = CheckedImageFolder(str(base / "val"), val_tf, fail_on_bad)
    return DataSplits(train, val, len(train_classes), **imagenet_stats())


CIFAR = {  # torchvision's on-disk layout (the python pickle batches)
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], label_key=b"fine_labels",
                     classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}


class TensorImages(Dataset):
    """uint8 images (N, C, H, W), C 1 or 3, held in memory; an item is made by `recipe`'s per-item
    transform (augmented when `train`). resident.py makes whole batches by the same recipe."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, recipe: ImageRecipe, train: bool):
        self.images, self.labels, self.recipe, self.train = images, labels, recipe, train
        self.transform = recipe.item_transform(train, images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def read_cifar_batches(folder: Path, names: list[str], label_key: bytes):
    import pickle

    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(torch.from_numpy(batch[b"data"]).view(-1, 3, 32, 32))
        labels.append(torch.tensor(batch[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def cifar(name: str, root: str, img_size: int, download: bool = False) -> DataSplits:
    spec = CIFAR[name]
    base = Path(root).expanduser()
    folder = base / spec["folder"]
    missing = [n for n in spec["train"] + spec["test"] if not (folder / n).is_file()]
    if missing and download:
        from torchvision import datasets

        {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name](str(base), download=True)
        missing = [n for n in spec["train"] + spec["test"] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{name} files not found: {folder / missing[0]} (torchvision's layout under data.root; "
                        "set data.download=true to fetch them)")
    recipe = ImageRecipe(img_size, padding=img_size // 8, mean=spec["mean"], std=spec["std"])
    train = TensorImages(*read_cifar_batches(folder, spec["train"], spec["label_key"]), recipe, train=True)
    val = TensorImages(*read_cifar_batches(folder, spec["test"], spec["label_key"]), recipe, train=False)
    return DataSplits(train, val, spec["classes"])


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the training images, in [0, 1]


def read_idx(path: Path) -> torch.Tensor:
    """An MNIST-family idx file of unsigned bytes (images or labels), plain or gzipped."""
    raw = path.read_bytes()
    try:
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:  # 0x08: unsigned byte data
            raise ValueError("not an idx file of unsigned bytes")
        dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
        offset = 4 + 4 * len(dims)
        if len(raw) - offset != int(np.prod(dims)):
            raise ValueError(f"{len(raw) - offset} data bytes for shape {tuple(dims)}")
    except (OSError, EOFError, ValueError) as e:  # gzip raises OSError/EOFError on damaged files
        raise UserError(f"cannot read idx file {path}: {e}") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).view(*dims)


def idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"fashion_mnist file not found: {root / name}[.gz] (install Debian's package with "
                    "'apt-get install dataset-fashion-mnist', or set data.root to a folder holding the four idx files)")


def fashion_mnist(root, img_size: int) -> DataSplits:
    """Zalando's Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images of 10 clothing classes."""
    base = Path(root or FASHION_MNIST_ROOT).expanduser()
    splits = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        x, y = read_idx(idx_file(base, images)), read_idx(idx_file(base, labels))
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise UserError(f"fashion_mnist files in {base} disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}")
        splits[split] = (x.unsqueeze(1), y.long())  # (N, 1, 28, 28) uint8
    recipe = ImageRecipe(img_size, padding=img_size // 14, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
    return DataSplits(TensorImages(*splits["train"], recipe, train=True), TensorImages(*splits["val"], recipe, train=False), 10)


# -------------------------------------------------------------- fixed subsets of in-memory datasets


def dataset_labels(dataset: Dataset):
    """Class of every sample, when the dataset keeps its labels in memory; else None."""
    if isinstance(dataset, TensorImages):
        return dataset.labels
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, ImageFolder):
        return torch.tensor(dataset.targets, dtype=torch.long)
    if hasattr(dataset, "labels"):  # hf: one column read
        return dataset.labels()
    return None


def sample_names(dataset: Dataset):
    """What messages call each sample: its file path, or the reader's own names (hf)."""
    return dataset.names if hasattr(dataset, "names") else [path for path, _ in dataset.samples]


def _take(dataset: Dataset, index: torch.Tensor) -> Dataset:
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[index], dataset.labels[index], dataset.recipe, dataset.train)
    return TensorDataset(*(t[index] for t in dataset.tensors))


def class_subset(labels: torch.Tensor, counts: list[int], seed: int = 0) -> torch.Tensor:
    """Indices of `counts[c]` samples of each class c, drawn by a fixed seed, in dataset order."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in enumerate(counts):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return torch.cat(chosen).sort().values


def stratified_counts(labels: torch.Tensor, num_classes: int, total: int, key: str) -> list[int]:
    """`total` samples spread over the classes in proportion to their share of the data."""
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


def subsample(splits: DataSplits, train_samples, val_samples, imbalance: float) -> DataSplits:
    """Fixed (seed 0) class-stratified subsets, and a long-tailed training set when imbalance < 1."""
    train, val = splits.train, splits.val
    if train_samples is not None or imbalance < 1.0:
        labels = dataset_labels(train)
        counts = stratified_counts(labels, splits.num_classes, train_samples or len(labels), "data.train_samples")
        train = _take(train, class_subset(labels, long_tailed_counts(counts, imbalance)))
    if val_samples is not None:
        labels = dataset_labels(val)
        val = _take(val, class_subset(labels, stratified_counts(labels, splits.num_classes, val_samples,
                                                                "data.val_samples")))
    return dataclasses.replace(splits, train=train, val=val)


def build_datasets(data_cfg, num_classes=None, seed: int = 0) -> DataSplits:
    d = data_cfg
    if d.dataset == "synthetic":  # made at the requested size: nothing to subsample
        return synthetic(num_classes or 10, d.img_size, d.train_samples or 2048, d.val_samples or 512, seed=seed)
    if d.dataset == "digits":
        splits = digits(d.img_size)
    elif d.dataset == "fashion_mnist":
        splits = fashion_mnist(d.root, d.img_size)
    elif d.dataset in CIFAR:
        splits = cifar(d.dataset, d.root, d.img_size, d.download)
    elif d.dataset == "hf":
        from pfb_train.data.hf import hf  # the datasets package is an optional extra

        splits = hf(d.root, d.train_split, d.val_split, d.image_key, d.label_key, d.img_size, d.auto_augment,
                    d.bad_images == "fail", d.decode, num_classes)
    elif d.dataset == "wds":
        from pfb_train.data.wds import wds

        splits = wds(d.root, d.train_split, d.val_split, num_classes, d.img_size, d.auto_augment,
                     d.bad_images == "fail", d.decode)
    else:
        splits = imagefolder(d.root, d.img_size, d.auto_augment, d.bad_images == "fail", d.decode)
    if d.dataset not in FILE_DATASETS:
        splits = subsample(splits, d.train_samples, d.val_samples, d.imbalance)
    if num_classes is not None and num_classes != splits.num_classes:
        raise UserError(f"config key 'model.num_classes' is {num_classes} but dataset '{d.dataset}' has {splits.num_classes} classes")
    return splits
