"""`pfb-train shards --config CFG --out DIR`: the train and validation splits of what the config's
`data` section reads, written as WebDataset shards in timm's layout (data/wds.py reads them, and
so does timm's `create_dataset("wds/...")`).

Images keep their stored bytes: JPEG, PNG and WebP files are copied as they are (no re-encode).
Datasets held as pixels (CIFAR, Fashion-MNIST) and other formats are written as PNG, which is
lossless. A file that does not decode at all is copied under its own extension: readers then
count it as an unreadable sample, as they would have in the folder.

Training samples are written in a fixed shuffled order (seed 0), so that a shard holds a mix of
classes (an ImageNet folder lists them class by class). Each shard is written to a `.partial`
file and renamed when complete, and `_info.json` is written last: running the command again on a
half-written DIR keeps the complete shards and writes the rest.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pfb_train.data.decode import BadImage, decode_rgb
from pfb_train.data.wds import INFO_FILE, check_complete, scan_shard
from pfb_train.errors import UserError

PLAN_FILE = "_shards_plan.json"  # present while DIR is unfinished: what it is being written from


@dataclass
class EncodedSplit:
    name: str  # the split's name in _info.json
    length: int
    read: Callable[[int], tuple[bytes, str, int]]  # index -> (encoded image, extension, label)


def image_kind(data: bytes):
    """'jpg', 'png' or 'webp' from the leading bytes, or None."""
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def stored(data: bytes, fallback_extension: str) -> tuple[bytes, str]:
    """The bytes as they are if readers take the format; else PNG; else (no decode) as they are."""
    kind = image_kind(data)
    if kind is not None:
        return data, kind
    try:  # the harness's one decode rule (data/decode.py): 16-bit keeps its top byte, bombs are refused
        return png(np.asarray(decode_rgb(data))), "png"
    except BadImage:  # stored as it is: it stands in when read, as on the other layouts
        return data, fallback_extension or "bin"


def _folder_split(folder: Path, name: str) -> EncodedSplit:
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder), loader=str).samples  # (path, class) in ImageFolder's order

    def read(i):
        path, label = samples[i]
        data, extension = stored(Path(path).read_bytes(), Path(path).suffix.lstrip(".").lower())
        return data, extension, label

    return EncodedSplit(name, len(samples), read)


def _pixel_split(images: np.ndarray, labels, name: str) -> EncodedSplit:
    """uint8 (N, C, H, W) images in memory, written as PNG."""
    def read(i):
        pixels = images[i].transpose(1, 2, 0)
        return png(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), "png", int(labels[i])

    return EncodedSplit(name, len(labels), read)


def encoded_splits(d) -> tuple[list[EncodedSplit], int]:
    """The (train, val) splits of the config's dataset as encoded images, and its number of classes."""
    names = (d.train_split, d.val_split)
    if d.dataset == "imagefolder":
        from pfb_train.data.datasets import folder_classes

        base = Path(d.root).expanduser()
        classes = folder_classes(base)
        return [_folder_split(base / split, name) for split, name in zip(("train", "val"), names)], len(classes)
    if d.dataset == "hf":
        from pfb_train.data.hf import HFImages, class_count, find_columns, load_splits

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
    if d.dataset in ("cifar10", "cifar100"):
        from pfb_train.data.datasets import CIFAR, cifar, read_cifar_batches

        spec = CIFAR[d.dataset]
        cifar(d.dataset, d.root, 32, d.download)  # checks (and fetches, if asked) the files
        folder = Path(d.root).expanduser() / spec["folder"]
        parts = [read_cifar_batches(folder, spec[part], spec["label_key"]) for part in ("train", "test")]
        return [_pixel_split(x.numpy(), y.numpy(), name) for (x, y), name in zip(parts, names)], spec["classes"]
    if d.dataset == "fashion_mnist":
        from pfb_train.data.datasets import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, idx_file, read_idx

        base = Path(d.root or FASHION_MNIST_ROOT).expanduser()
        splits = []
        for (images, labels), name in zip(FASHION_MNIST_FILES.values(), names):
            x, y = read_idx(idx_file(base, images)), read_idx(idx_file(base, labels))
            splits.append(_pixel_split(x.unsqueeze(1).numpy(), y.numpy(), name))
        return splits, 10
    if d.dataset == "digits":  # 8x8 images of 17 grey levels, written at their own size
        from pfb_train.data.datasets import load_digits

        images, labels, *split = load_digits()
        pixels = (images * 255).round().to(torch.uint8).numpy()
        return [_pixel_split(pixels[index], labels[index].numpy(), name) for index, name in zip(split, names)], 10
    raise UserError(f"dataset '{d.dataset}' has no stored images to write; `pfb-train shards` reads "
                    "imagefolder, hf, cifar10, cifar100, fashion_mnist and digits")


def _tar_writer():
    try:
        from webdataset import TarWriter
    except ImportError:
        raise UserError("`pfb-train shards` needs the webdataset package: pip install 'pfb-train[data]'") from None
    return TarWriter


def _atomic_json(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)


def write_shards(d, out: str, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Write (or finish writing) DIR; returns the _info.json written."""
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    TarWriter = _tar_writer()
    splits, num_classes = encoded_splits(d)
    out_dir = Path(out).expanduser()
    plan = {"dataset": d.dataset, "root": str(d.root), "samples_per_shard": samples_per_shard,
            "splits": {s.name: s.length for s in splits}}
    if (out_dir / INFO_FILE).is_file() and not (out_dir / PLAN_FILE).is_file():
        print(f"{out_dir} is already complete ({INFO_FILE}): nothing to write")
        return json.loads((out_dir / INFO_FILE).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PLAN_FILE).is_file():
        begun = json.loads((out_dir / PLAN_FILE).read_text())
        if begun != plan:
            changed = next(k for k in plan if begun.get(k) != plan[k])
            raise UserError(f"{out_dir} was begun with {changed} {begun.get(changed)!r}, not {plan[changed]!r}: "
                            "run again with the same config and --samples-per-shard, or choose another --out")
    else:
        _atomic_json(out_dir / PLAN_FILE, plan)
    for leftover in out_dir.glob("*.partial"):  # a shard being written when the last run stopped
        leftover.unlink()

    total = sum(s.length for s in splits)
    bar = tqdm(total=total, unit="img", desc=f"shards -> {out_dir}", disable=not progress, dynamic_ncols=True)
    info = {"name": d.dataset, "num_classes": num_classes, "splits": {}}
    for split in splits:
        order = np.random.default_rng(0).permutation(split.length) if split is splits[0] else np.arange(split.length)
        entry = {"name": split.name, "num_samples": 0, "filenames": [], "shard_lengths": [], "shard_bytes": []}
        for first in range(0, split.length, samples_per_shard):
            chosen = order[first : first + samples_per_shard]
            filename = f"{split.name}-{first // samples_per_shard:06d}.tar"
            path = out_dir / filename
            if path.is_file():  # finished by an earlier run
                check_complete(str(path))
                length = len(scan_shard(str(path)))
            else:
                partial = path.with_name(filename + ".partial")
                with open(partial, "wb") as f:
                    with TarWriter(f, encoder=False, mtime=0) as writer:  # fixed times: the same bytes every run
                        for index in chosen.tolist():
                            data, extension, label = split.read(index)
                            writer.write({"__key__": f"{index:08d}", extension: data, "cls": str(label).encode()})
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the name says it is complete
                os.replace(partial, path)
                length = len(chosen)
            bar.update(len(chosen))
            entry["filenames"].append(filename)
            entry["shard_lengths"].append(length)
            entry["shard_bytes"].append(path.stat().st_size)
        entry["num_samples"] = sum(entry["shard_lengths"])
        info["splits"][split.name] = entry
    bar.close()
    _atomic_json(out_dir / INFO_FILE, info)
    (out_dir / PLAN_FILE).unlink()
    return info
