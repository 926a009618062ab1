"""`cifar10`, `cifar100`: torchvision's CIFAR files under `data.root` (`cifar-10-batches-py/`,
`cifar-100-python/`), read by torchvision's own dataset classes and held in memory as uint8; fetched
only when `data.download` is set."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from pfb_train.data.augment import ImageRecipe
from pfb_train.data.encoded import pixel_split
from pfb_train.data.registry import DataSource, register
from pfb_train.data.splits import DataSplits, TensorImages
from pfb_train.errors import UserError


class _PresentFiles:
    """torchvision's CIFAR readers with the files' presence checked instead of their MD5 sums, and no
    class-name file read: the harness names a missing file in one line itself (`cifar_arrays`), reads
    any files in the layout (the tests write small ones), and needs no class names."""

    root: Union[str, Path]  # set by torchvision's reader, which comes after this class

    def _check_integrity(self) -> bool:  # also what torchvision's download() asks before fetching
        return not _missing(self.root, self)

    def _load_meta(self) -> None:
        pass


class _CIFAR10(_PresentFiles, CIFAR10):
    pass


class _CIFAR100(_PresentFiles, CIFAR100):
    pass


READERS: dict[str, type[CIFAR10]] = {"cifar10": _CIFAR10, "cifar100": _CIFAR100}
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # mean, std of [0, 1] pixels
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CLASSES = {"cifar10": 10, "cifar100": 100}


def _missing(root, reader) -> list[Path]:
    """The data files of `reader`'s layout (torchvision's lists, class or instance) not under `root`."""
    folder = Path(root) / reader.base_folder
    return [folder / name for name, _ in reader.train_list + reader.test_list if not (folder / name).is_file()]


def cifar_arrays(name: str, root: str, download: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val"}: (images uint8 (N, 3, 32, 32), labels int64 (N,)) of CIFAR `name` under `root`.
    Fetches the files first when some are missing and `download` is set; else a missing file is a
    one-line UserError naming it."""
    reader = READERS[name]
    base = str(Path(root).expanduser())
    if _missing(base, reader) and download:
        reader(base, train=True, download=True)
    missing = _missing(base, reader)
    if missing:
        raise UserError(
            f"{name} files not found: {missing[0]} (torchvision's layout under data.root; "
            "set data.download=true to fetch them)"
        )
    arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, train in (("train", True), ("val", False)):
        part = reader(base, train=train)
        images = torch.from_numpy(part.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        arrays[split] = images, torch.tensor(part.targets, dtype=torch.long)
    return arrays


def cifar(name: str, root: str, img_size: int, download: bool = False) -> DataSplits:
    """CIFAR `name` as TensorImages: pad-crop-flip for training (padding img_size // 8), normalised by
    the training set's mean and std."""
    arrays = cifar_arrays(name, root, download)
    mean, std = STATS[name]
    recipe = ImageRecipe(img_size, padding=img_size // 8, mean=mean, std=std)
    return DataSplits(
        TensorImages(*arrays["train"], recipe, train=True),
        TensorImages(*arrays["val"], recipe, train=False),
        CLASSES[name],
    )


def _source(name: str) -> DataSource:
    def encode(d):
        arrays = cifar_arrays(name, d.root, d.download)
        return [
            pixel_split(x.numpy(), y.numpy(), split)
            for (x, y), split in zip(arrays.values(), (d.train_split, d.val_split))
        ], CLASSES[name]

    return DataSource(
        name,
        build=lambda d, num_classes, seed: cifar(name, d.root, d.img_size, d.download),
        summary=f"torchvision's {name.upper()} files under data.root ({READERS[name].base_folder}/; "
        f"data.download=true fetches them); {CLASSES[name]} classes, held in memory",
        needs_root=True,
        options=("root", "download", "train_samples", "val_samples", "imbalance"),
        num_classes=lambda d: CLASSES[name],
        encode=encode,
    )


register(_source("cifar10"))
register(_source("cifar100"))
