"""`fashion_mnist`: Zalando's Fashion-MNIST from its four standard idx files (plain or gzipped), by
default where Debian's `dataset-fashion-mnist` package puts them; held in memory as uint8."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from pfb_train.data.augment import ImageRecipe
from pfb_train.data.encoded import pixel_split
from pfb_train.data.registry import DataSource, register
from pfb_train.data.splits import DataSplits, TensorImages
from pfb_train.errors import UserError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = 10
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the training images, in [0, 1]


def read_idx(path: Path) -> torch.Tensor:
    """An MNIST-family idx file of unsigned bytes (images or labels), plain or gzipped, as a uint8 tensor
    of the file's shape. A damaged file is a one-line UserError naming it."""
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
    """`root/name` or `root/name.gz`; a one-line UserError saying how to get the files if neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"fashion_mnist file not found: {root / name}[.gz] (install Debian's package with "
        "'apt-get install dataset-fashion-mnist', or set data.root to a folder holding the four idx files)"
    )


def fashion_mnist_arrays(root) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val"}: (images uint8 (N, 1, 28, 28), labels int64 (N,)) from the idx files under `root`
    (None: Debian's folder)."""
    base = Path(root or FASHION_MNIST_ROOT).expanduser()
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        x, y = read_idx(idx_file(base, images)), read_idx(idx_file(base, labels))
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise UserError(f"fashion_mnist files in {base} disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}")
        if len(y) and int(y.max()) >= CLASSES:  # another MNIST-family set (EMNIST's letters: 1..26)
            raise UserError(
                f"labels file {idx_file(base, labels)} holds class {int(y.max())}, outside 0..{CLASSES - 1}: "
                f"fashion_mnist has {CLASSES} classes (is data.root another data set's folder?)"
            )
        splits[split] = (x.unsqueeze(1), y.long())
    return splits


def fashion_mnist(root, img_size: int) -> DataSplits:
    """Zalando's Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images of 10 clothing classes."""
    splits = fashion_mnist_arrays(root)
    recipe = ImageRecipe(img_size, padding=img_size // 14, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
    return DataSplits(
        TensorImages(*splits["train"], recipe, train=True), TensorImages(*splits["val"], recipe, train=False), CLASSES
    )


def encode_fashion_mnist(d) -> tuple[list, int]:
    """Both splits as PNG, and the class count (10)."""
    arrays = fashion_mnist_arrays(d.root)
    return [
        pixel_split(x.numpy(), y.numpy(), name) for (x, y), name in zip(arrays.values(), (d.train_split, d.val_split))
    ], CLASSES


register(
    DataSource(
        "fashion_mnist",
        build=lambda d, num_classes, seed: fashion_mnist(d.root, d.img_size),
        summary="Fashion-MNIST's four idx files (plain or gzipped) in data.root (null: "
        f"{FASHION_MNIST_ROOT}, Debian's dataset-fashion-mnist); 10 classes, held in memory",
        options=("root", "train_samples", "val_samples", "imbalance"),
        encode=encode_fashion_mnist,
    )
)
