"""What every data source returns (`DataSplits`) and the item makers sources share: in-memory uint8
images (`TensorImages`), the timm worker transforms and their normalisation, the item of an image held
as encoded bytes (`decode_stored`). Imports no source: each source module imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, cast

import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder

from pfb_train.data.augment import ImageRecipe
from pfb_train.data.decode import BadImage, decode_rgb
from pfb_train.data.missing import skip_or_fail


class SizedDataset(Protocol):
    """A map-style dataset with a length, as every source's is (torch's `Dataset` type leaves `__len__` out)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


@dataclass
class DataSplits:
    """The train and validation datasets of one source. Items are (image, label int) pairs; the loaders
    add each sample's index."""

    train: SizedDataset
    val: SizedDataset
    num_classes: int
    decode_on_device: bool = False  # items are file bytes (data.decode: device or dali)
    notes: tuple = ()  # what the reader found and worked around, printed once at the start (wds)
    # Items are uint8 images (the cpu decode path), normalised on the training device with this mean
    # and std of [0, 1] pixels (normalize.py); None: items are model input already.
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    # Float items: the (mean, std) of [0, 1] pixels they were normalised with (digits); None: made as they are.
    input_stats: Optional[tuple] = None


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


def decode_stored(data: bytes, label: int, name: str, transform, fail: bool):
    """The item of an image held as encoded bytes (hf, wds): (image, label).

    For the device decoders (`transform` None) the bytes as a uint8 tensor, which they count as
    unreadable when empty; else the transformed image decoded by decode.py's rule, or a stand-in
    (`Unreadable`; with `fail` a UserError naming `name`) when it does not decode."""
    if transform is None:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(
            0, dtype=torch.uint8
        ), label
    try:
        image = decode_rgb(data or b"")
    except BadImage as e:
        return skip_or_fail(name, str(e), fail)
    return transform(image), label


def worker_transforms(img_size: int, auto_augment=None) -> tuple:
    """timm's train and eval transforms for DataLoader workers (imagefolder, hf, wds), ending in uint8
    (3, H, W) tensors as timm's own loader uses them (`use_prefetcher=True`): a quarter of float32's
    bytes leave the workers; the device normalises them with `imagenet_stats()`."""
    return (
        create_transform(img_size, is_training=True, auto_augment=auto_augment, use_prefetcher=True),
        create_transform(img_size, is_training=False, use_prefetcher=True),
    )


def imagenet_stats() -> dict:
    """DataSplits' `mean` and `std` for worker_transforms' uint8 items: timm's ImageNet defaults."""
    return dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def timm_data_config(splits: DataSplits, in_chans: int, img_size: int) -> dict:
    """timm's data config of the model's input as this run evaluated it (export.py writes it into config.json,
    so timm's resolve_data_config + create_transform rebuild the evaluation's preprocessing): `input_size`
    (in_chans, img_size, img_size), `mean` and `std` of [0, 1] pixels per input channel (a grey channel's
    repeated; 0 and 1 for float data used as made), and the resize and crop: timm's eval transform for files
    (crop_pct 0.875), none for images held in memory at the input size (crop_pct 1)."""
    recipe = getattr(splits.train, "recipe", None)
    crop_pct = 1.0  # in-memory sets: the whole image, resized to the input size
    if splits.mean is not None or splits.decode_on_device:  # files: timm's eval transform, or the same on the device
        mean, std = splits.mean or IMAGENET_DEFAULT_MEAN, splits.std or IMAGENET_DEFAULT_STD
        crop_pct = DEFAULT_CROP_PCT
    elif recipe is not None:  # TensorImages: CIFAR, Fashion-MNIST
        mean, std = recipe.mean, recipe.std
    else:
        mean, std = splits.input_stats or ((0.0,), (1.0,))
    return {
        "input_size": (in_chans, img_size, img_size),
        "mean": tuple(mean) * (in_chans // len(mean)),
        "std": tuple(std) * (in_chans // len(std)),
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "interpolation": "bilinear",
    }


def sample_names(dataset: SizedDataset):
    """What messages call each sample: its file path, or the reader's own names (hf, wds)."""
    if hasattr(dataset, "names"):
        return dataset.names
    return [path for path, _ in cast(DatasetFolder, dataset).samples]  # imagefolder: (path, label) pairs


def sample_namer(dataset: SizedDataset):
    """index -> what messages call that sample: `sample_names`', or 'training sample i' for a set held in
    memory (no files; none is ever unreadable)."""
    if not hasattr(dataset, "names") and not hasattr(dataset, "samples"):
        return lambda index: f"training sample {index}"
    names = sample_names(dataset)
    return lambda index: str(names[index])
