"""`imagefolder`: the ImageNet layout `root/train/<class>/*`, `root/val/<class>/*` (the same class folders
in both), read by torchvision's ImageFolder, decoded by decode.py's rule with timm's transforms in the
workers (or read as bytes for `data.decode: device` and `dali`)."""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from pfb_train.data.decode import BadImage, decode_rgb
from pfb_train.data.device_decode import read_bytes
from pfb_train.data.encoded import EncodedSplit, stored
from pfb_train.data.missing import skip_or_fail
from pfb_train.data.registry import DataSource, register
from pfb_train.data.splits import DataSplits, imagenet_stats, worker_transforms
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


def _check_no_link_loops(split_dir: Path) -> None:
    """ImageFolder follows symbolic links; a link back up the tree would list the same images again
    and again (until paths grow too long), so a loop is a one-line error instead."""
    seen = set()
    for folder, _subfolders, _ in os.walk(split_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"symbolic link loop in the data folder: {folder} leads back to {real}")
        seen.add(real)


def _holds_an_image(folder: Path) -> bool:
    """Whether ImageFolder finds an image for this class: torchvision's rule, any file with an image
    extension in the folder or below it (symbolic links followed). Stops at the first one."""
    return any(
        has_file_allowed_extension(name, IMAGE_EXTENSIONS)
        for _, _, files in os.walk(folder, followlinks=True)
        for name in files
    )


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
            raise UserError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                "neither directly nor in its subfolders"
            )
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


def imagefolder(
    root: str, img_size: int, auto_augment=None, fail_on_bad: bool = False, decode: str = "cpu"
) -> DataSplits:
    """The folder's train and validation splits, checked (folder_classes). `decode` cpu: uint8 (3, H, W)
    items from timm's transforms, stood in for when unreadable (with `fail_on_bad`, a UserError); device,
    dali: each file's bytes, decoded on the device or by DALI."""
    base = Path(root).expanduser()
    train_classes = folder_classes(base)
    if decode != "cpu":  # device, dali: workers read bytes; DeviceDecodeLoader or DaliLoader decodes and augments
        train, val = (ImageFolder(str(base / split), loader=read_bytes) for split in ("train", "val"))
        return DataSplits(train, val, len(train_classes), decode_on_device=True)
    train_tf, val_tf = worker_transforms(img_size, auto_augment)
    train = CheckedImageFolder(str(base / "train"), train_tf, fail_on_bad)
    val = CheckedImageFolder(str(base / "val"), val_tf, fail_on_bad)
    return DataSplits(train, val, len(train_classes), **imagenet_stats())


def folder_split(folder: Path, name: str) -> EncodedSplit:
    """The images of one split folder as stored, in ImageFolder's order with its class indices."""
    samples = ImageFolder(str(folder), loader=str).samples  # (path, class); loader=str: nothing is read here

    def read(i):
        path, label = samples[i]
        data, extension = stored(Path(path).read_bytes(), Path(path).suffix.lstrip(".").lower())
        return data, extension, label

    return EncodedSplit(name, len(samples), read)


def encode_imagefolder(d) -> tuple[list, int]:
    """Both split folders as stored (JPEG, PNG, WebP byte for byte), and the class count."""
    base = Path(d.root).expanduser()
    classes = folder_classes(base)
    names = (d.train_split, d.val_split)
    return [folder_split(base / split, name) for split, name in zip(("train", "val"), names)], len(classes)


def count_classes(d) -> int:
    """The class folders of `root/train` (no checks: what `pfb-train info` shows); 1000 when not there."""
    train = Path(d.root or "", "train").expanduser()
    if d.root and train.is_dir():
        return sum(1 for p in train.iterdir() if p.is_dir())
    return 1000


register(
    DataSource(
        "imagefolder",
        build=lambda d, num_classes, seed: imagefolder(
            d.root, d.img_size, d.auto_augment, d.bad_images == "fail", d.decode
        ),
        summary="a folder tree data.root/train/<class>/* and data.root/val/<class>/* (ImageNet's layout), "
        "on each node's disk",
        samples="stored",
        imbalance=False,
        decodes=("cpu", "device", "dali"),
        needs_root=True,
        options=("root", "bad_images"),
        num_classes=count_classes,
        encode=encode_imagefolder,
    )
)
