"""Hugging Face datasets (`data.dataset: hf`), read map-style.

`data.root` is one of:
- a directory written by `DatasetDict.save_to_disk` (it holds `dataset_dict.json`);
- a folder of Parquet files named `<split>-*.parquet`, anywhere below it (the Hub's layout);
- a Hub name (`imagenet-1k`), read offline from the local `datasets` cache.

Random access by index, so the harness's own sampler, sample indices, every selection method and
exact resume work as with `imagefolder`. The image column is read as its stored bytes: `data.decode:
cpu` decodes them with PIL in the workers (decode.py's rule, timm transforms), `data.decode: device`
and `dali` hand the stored bytes to the batched device decoder or to DALI without a PIL round trip.
An image that does not decode (null, empty, truncated, over the pixel limit) is an `Unreadable`
item (data/missing.py), as an unreadable file is.

Columns: `datasets`' Image and ClassLabel features, or the same written without their metadata
(plain Parquet from pyarrow or pandas): a struct column with a binary `bytes` field (and usually
`path`) for the images, an integer column for the classes, whose count is then `model.num_classes`
or else the largest label + 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pfb_train.data.encoded import EncodedSplit, stored
from pfb_train.data.registry import DataSource, register
from pfb_train.data.splits import DataSplits, decode_stored, imagenet_stats, worker_transforms
from pfb_train.errors import UserError


def _datasets():
    try:
        import datasets  # optional (the `data` extra): imported only when this source is used
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
        files = {
            split: sorted(
                {str(p) for pattern in (f"{split}-*.parquet", f"{split}.parquet") for p in path.rglob(pattern)}
            )
            for split in splits
        }
        for split, found in files.items():
            if not found:
                raise UserError(
                    f"no {split}-*.parquet files under {path}, nor {split}.parquet (data.dataset 'hf': "
                    "a save_to_disk folder, Parquet files named <split>-*.parquet, or a Hub name)"
                )
        loaded = datasets.load_dataset("parquet", data_files=files)
    else:
        # Never the network at train time. The flags are read at import, so the loaded modules are set too.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants  # comes with `datasets`, optional like it

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            loaded = datasets.load_dataset(root)
        except Exception:
            raise UserError(
                f"data.root '{root}' is neither a folder nor a dataset in the local Hugging Face cache; "
                f"download it once with: python -c \"import datasets; datasets.load_dataset('{root}')\""
            ) from None
    missing = [split for split in splits if split not in loaded]
    if missing:
        raise UserError(
            f"split '{missing[0]}' not found in {root} (it has: {', '.join(loaded)}); "
            "set data.train_split / data.val_split"
        )
    return loaded


def _is_binary(feature) -> bool:
    return isinstance(feature, _datasets().Value) and feature.dtype in ("binary", "large_binary")


def _is_image_struct(feature) -> bool:
    """An Image column stored without datasets' metadata: a struct with a binary `bytes` field."""
    return isinstance(feature, dict) and _is_binary(feature.get("bytes"))


def _is_integer(feature) -> bool:
    return isinstance(feature, _datasets().Value) and feature.dtype.startswith(("int", "uint"))


def _describe(features) -> str:
    """'name (kind), ...' of every column, for messages."""

    def kind(feature) -> str:
        if isinstance(feature, dict):
            return "struct of " + "/".join(feature)
        return feature.dtype if isinstance(feature, _datasets().Value) else type(feature).__name__

    return ", ".join(f"{name} ({kind(feature)})" for name, feature in features.items())


def _pick(features, kinds, option: str) -> str:
    """The only column of the first kind ("X column", test) that has any; a one-line UserError naming
    `data.<option>` when there is none or more than one."""
    for wanted, test in kinds:
        found = [name for name, feature in features.items() if test(feature)]
        if len(found) == 1:
            return found[0]
        if found:
            raise UserError(f"more than one {wanted}; set data.{option} (columns: {_describe(features)})")
    (first, _), (second, _) = kinds
    raise UserError(f"no {first} (nor a {second}); set data.{option} (columns: {_describe(features)})")


def find_columns(features, image_key, label_key) -> tuple[str, str]:
    """The image column and the class-label column: as configured, or the only one of each kind.

    Images: an `Image` column, or (plain Parquet) a struct with a binary `bytes` field; named, also a
    binary column. Labels: a `ClassLabel` column, or an integer column. Without a key, the only Image
    column, else the only such struct; the only ClassLabel column, else the only integer column.
    Raises a one-line UserError listing the columns when a key names no such column, or the choice
    is not unique."""
    datasets = _datasets()
    images = [
        ("Image column", lambda f: isinstance(f, datasets.Image)),
        ("struct column with a bytes field", _is_image_struct),
    ]
    labels = [("ClassLabel column", lambda f: isinstance(f, datasets.ClassLabel)), ("integer column", _is_integer)]
    named = (
        (image_key, [*images, ("binary", _is_binary)], "an Image column (nor a struct with a bytes field, nor binary)"),
        (label_key, labels, "a ClassLabel column (nor integers)"),
    )
    for key, kinds, wanted in named:
        if key is not None and (key not in features or not any(test(features[key]) for _, test in kinds)):
            raise UserError(f"column '{key}' is not {wanted} (columns: {_describe(features)})")
    return image_key or _pick(features, images, "image_key"), label_key or _pick(features, labels, "label_key")


def class_count(splits: dict, label_key: str, num_classes=None) -> int:
    """The number of classes of `splits` ({name: datasets.Dataset}). A ClassLabel says it; for integer
    labels it is `num_classes` (model.num_classes) when set, else the largest label + 1. Raises a
    one-line UserError for a null or negative label (the Hub's test splits mark "no label" with -1, even
    in a ClassLabel column), or one >= the class count."""
    import pyarrow.compute as pc  # comes with `datasets`, optional like it

    feature = next(iter(splits.values())).features[label_key]
    said = f"model.num_classes {num_classes}"
    if isinstance(feature, _datasets().ClassLabel):
        num_classes, said = feature.num_classes, f"its ClassLabel has {feature.num_classes} classes"
    largest = -1
    for name, split in splits.items():
        column = split.with_format("arrow")[label_key]  # one column read, no images
        if column.null_count:
            raise UserError(
                f"label column '{label_key}' of {name} has {column.null_count} null value(s); "
                "every sample needs a class"
            )
        low, high = (pc.min_max(column)[k].as_py() for k in ("min", "max"))
        if low is not None and low < 0:
            raise UserError(
                f"label column '{label_key}' of {name} holds {low}: classes are numbered from 0 (the Hub "
                "marks unlabelled samples, e.g. of a test split, with -1: set data.train_split / "
                "data.val_split to labelled splits)"
            )
        if high is not None and num_classes is not None and high >= num_classes:
            raise UserError(f"label column '{label_key}' of {name} holds {high}, outside 0..{num_classes - 1} ({said})")
        largest = max(largest, -1 if high is None else high)
    return num_classes if num_classes is not None else largest + 1


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
        """(N,) int64 class of every sample, from one column read."""
        return torch.from_numpy(self.table.with_format("arrow")[self.label_key].to_numpy().astype("int64"))

    def encoded(self, index: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of sample `index`; the bytes are empty when the cell is null or
        empty, or names a file that cannot be read (decoding then counts it as unreadable)."""
        row = self.table[index]
        image = row[self.image_key] or {}
        data = image.get("bytes")
        if not data and image.get("path"):
            try:
                data = Path(image["path"]).read_bytes()
            except OSError:
                data = None
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


def hf(
    root: str,
    train_split: str,
    val_split: str,
    image_key,
    label_key,
    img_size: int,
    auto_augment=None,
    fail_on_bad: bool = False,
    decode: str = "cpu",
    num_classes=None,
) -> DataSplits:
    """The train and validation splits of a Hugging Face dataset (see the module). `num_classes`
    (model.num_classes) is needed only for integer labels without a ClassLabel, and then optional."""
    if root is None:
        raise UserError("config key 'data.root' is required for dataset 'hf' (a folder or a Hub name)")
    loaded = load_splits(root, (train_split, val_split))
    image_key, label_key = find_columns(loaded[train_split].features, image_key, label_key)
    num_classes = class_count(
        {f"{root}:{name}": loaded[name] for name in (train_split, val_split)}, label_key, num_classes
    )
    on_device = decode != "cpu"  # device, dali: workers read the stored bytes
    train_tf, val_tf = (None, None) if on_device else worker_transforms(img_size, auto_augment)
    train = HFImages(loaded[train_split], image_key, label_key, f"{root}:{train_split}", train_tf, fail_on_bad)
    val = HFImages(loaded[val_split], image_key, label_key, f"{root}:{val_split}", val_tf, fail_on_bad)
    return DataSplits(train, val, num_classes, decode_on_device=on_device, **({} if on_device else imagenet_stats()))


def encode_hf(d) -> tuple[list, int]:
    """The train and validation splits as stored images: each cell's bytes as they are (or PNG, see
    encoded.stored), in the source's order."""
    names = (d.train_split, d.val_split)
    loaded = load_splits(d.root, names)
    image_key, label_key = find_columns(loaded[names[0]].features, d.image_key, d.label_key)
    splits = []
    for name in names:
        table = HFImages(loaded[name], image_key, label_key, f"{d.root}:{name}")

        def read(i, table=table):
            data, label = table.encoded(i)
            return (*stored(data, "bin"), label)

        splits.append(EncodedSplit(name, len(table), read))
    return splits, class_count({f"{d.root}:{n}": loaded[n] for n in names}, label_key)


register(
    DataSource(
        "hf",
        build=lambda d, num_classes, seed: hf(
            d.root,
            d.train_split,
            d.val_split,
            d.image_key,
            d.label_key,
            d.img_size,
            d.auto_augment,
            d.bad_images == "fail",
            d.decode,
            num_classes,
        ),
        summary="a Hugging Face dataset in data.root: a save_to_disk folder, Parquet files <split>-*.parquet, or a "
        "Hub name in the local cache (needs the `datasets` package)",
        samples="stored",
        imbalance=False,
        decodes=("cpu", "device", "dali"),
        needs_root=True,
        options=("root", "train_split", "val_split", "image_key", "label_key", "bad_images"),
        encode=encode_hf,
    )
)
