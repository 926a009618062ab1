"""Hugging Face datasets (`data.dataset: hf`), read map-style.

`data.root` is one of:
- a directory written by `DatasetDict.save_to_disk` (it holds `dataset_dict.json`);
- a folder of Parquet files named `<split>-*.parquet`, anywhere below it (the Hub's layout);
- a Hub name (`imagenet-1k`), read offline from the local `datasets` cache.

Random access by index, so the harness's own sampler, sample indices, every selection method and
exact resume work as with `imagefolder`. The image column is read as its stored bytes: `data.decode:
cpu` decodes them with PIL in the workers (timm transforms), `data.decode: device` and `dali` hand
the stored bytes to the batched device decoder or to DALI without a PIL round trip. An image that does not decode is an
`Unreadable` item (data/missing.py), as an unreadable file is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pfb_train.data.datasets import DataSplits, decode_stored, imagenet_stats, worker_transforms
from pfb_train.errors import UserError


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("data.dataset 'hf' needs the datasets package: pip install 'pfb-train[data]'") from None
    return datasets


def load_splits(root: str, splits: tuple[str, str]):
    """A DatasetDict holding at least `splits`, from a save_to_disk folder, Parquet files or the cache."""
    datasets = _datasets()
    path = Path(root).expanduser()
    if (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        files = {split: sorted(str(p) for p in path.rglob(f"{split}-*.parquet")) for split in splits}
        for split, found in files.items():
            if not found:
                raise UserError(f"no {split}-*.parquet files under {path} (data.dataset 'hf': a save_to_disk folder, "
                                "Parquet files named <split>-*.parquet, or a Hub name)")
        loaded = datasets.load_dataset("parquet", data_files=files)
    else:
        # Never the network at train time. The flags are read at import, so the loaded modules are set too.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            loaded = datasets.load_dataset(root)
        except Exception:
            raise UserError(f"data.root '{root}' is neither a folder nor a dataset in the local Hugging Face cache; "
                            f"download it once with: python -c \"import datasets; datasets.load_dataset('{root}')\"")
    missing = [split for split in splits if split not in loaded]
    if missing:
        raise UserError(f"split '{missing[0]}' not found in {root} (it has: {', '.join(loaded)}); "
                        "set data.train_split / data.val_split")
    return loaded


def find_columns(features, image_key, label_key) -> tuple[str, str]:
    """The image column and the class-label column: as configured, or the only one of each kind."""
    datasets = _datasets()
    for key, kind, wanted in ((image_key, datasets.Image, "an Image"), (label_key, datasets.ClassLabel, "a ClassLabel")):
        if key is not None and (key not in features or not isinstance(features[key], kind)):
            raise UserError(f"column '{key}' is not {wanted} column (columns: {', '.join(features)})")

    def only(kind, option: str, wanted: str) -> str:
        found = [name for name, feature in features.items() if isinstance(feature, kind)]
        if len(found) != 1:
            raise UserError(f"{'no' if not found else 'more than one'} {wanted} column; set data.{option} "
                            f"(columns: {', '.join(f'{n} ({type(f).__name__})' for n, f in features.items())})")
        return found[0]

    return (image_key or only(datasets.Image, "image_key", "Image"),
            label_key or only(datasets.ClassLabel, "label_key", "ClassLabel"))


class HFImages(Dataset):
    """(image, label) items of one split; with `transform=None`, (encoded bytes as a uint8 tensor, label)."""

    def __init__(self, table, image_key: str, label_key: str, name: str, transform=None, fail: bool = False):
        datasets = _datasets()
        self.table = table.cast_column(image_key, datasets.Image(decode=False))  # the stored bytes, no PIL
        self.image_key, self.label_key, self.name = image_key, label_key, name
        self.transform, self.fail = transform, fail
        self.names = _Names(name, len(table))  # what messages call sample i

    def __len__(self) -> int:
        return len(self.table)

    def labels(self) -> torch.Tensor:
        return torch.tensor(self.table[self.label_key], dtype=torch.long)

    def encoded(self, index: int) -> tuple[bytes, int]:
        row = self.table[index]
        image = row[self.image_key]
        data = image.get("bytes")
        if data is None and image.get("path"):
            data = Path(image["path"]).read_bytes()
        return data or b"", row[self.label_key]

    def __getitem__(self, index: int):
        return decode_stored(*self.encoded(index), self.names[index], self.transform, self.fail)


class _Names:
    """`names[i]` -> 'ROOT:split[i]', without a list of a million strings."""

    def __init__(self, name: str, length: int):
        self.name, self.length = name, length

    def __getitem__(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def __len__(self) -> int:
        return self.length


def hf(root: str, train_split: str, val_split: str, image_key, label_key, img_size: int, auto_augment=None,
       fail_on_bad: bool = False, decode: str = "cpu"):
    if root is None:
        raise UserError("config key 'data.root' is required for dataset 'hf' (a folder or a Hub name)")
    loaded = load_splits(root, (train_split, val_split))
    image_key, label_key = find_columns(loaded[train_split].features, image_key, label_key)
    num_classes = loaded[train_split].features[label_key].num_classes
    on_device = decode != "cpu"  # device, dali: workers read the stored bytes
    train_tf, val_tf = (None, None) if on_device else worker_transforms(img_size, auto_augment)
    train = HFImages(loaded[train_split], image_key, label_key, f"{root}:{train_split}", train_tf, fail_on_bad)
    val = HFImages(loaded[val_split], image_key, label_key, f"{root}:{val_split}", val_tf, fail_on_bad)
    return DataSplits(train, val, num_classes, decode_on_device=on_device, **({} if on_device else imagenet_stats()))
