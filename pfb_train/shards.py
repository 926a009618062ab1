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

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pfb_train.data.encoded import EncodedSplit
from pfb_train.data.registry import get_source, sources
from pfb_train.data.wds import INFO_FILE, check_complete, scan_shard
from pfb_train.errors import UserError

PLAN_FILE = "_shards_plan.json"  # present while DIR is unfinished: what it is being written from


def encoded_splits(d) -> tuple[list[EncodedSplit], int]:
    """The (train, val) splits of the config's dataset as encoded images, and its number of classes:
    the source's own `encode` (data/registry.py). A source without one is a one-line UserError."""
    source = get_source(d.dataset)
    if source.encode is None:
        writable = [s.name for s in sources().values() if s.encode is not None]
        raise UserError(
            f"dataset '{d.dataset}' has no stored images to write; `pfb-train shards` reads {', '.join(writable)}"
        )
    return source.encode(d)


def _tar_writer():
    try:
        from webdataset import TarWriter  # optional (the `data` extra): only writing shards needs it
    except ImportError:
        raise UserError("`pfb-train shards` needs the webdataset package: pip install 'pfb-train[data]'") from None
    return TarWriter


def _atomic_json(path: Path, value: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)


def write_shard(path: Path, split, indices: list[int], TarWriter) -> None:
    """One shard of `split`'s samples `indices`, written to `path` + '.partial' and renamed once on disk."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        with TarWriter(f, encoder=False, mtime=0) as writer:  # fixed times: the same bytes every run
            for index in indices:
                data, extension, label = split.read(index)
                writer.write({"__key__": f"{index:08d}", extension: data, "cls": str(label).encode()})
        f.flush()
        os.fsync(f.fileno())  # on disk before the name says it is complete
    os.replace(partial, path)


def write_shards(d, out: str, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Write (or finish writing) DIR; returns the _info.json written."""
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    TarWriter = _tar_writer()
    splits, num_classes = encoded_splits(d)
    out_dir = Path(out).expanduser()
    plan = {
        "dataset": d.dataset,
        "root": str(d.root),
        "samples_per_shard": samples_per_shard,
        "splits": {s.name: s.length for s in splits},
    }
    if (out_dir / INFO_FILE).is_file() and not (out_dir / PLAN_FILE).is_file():
        print(f"{out_dir} is already complete ({INFO_FILE}): nothing to write")
        return json.loads((out_dir / INFO_FILE).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PLAN_FILE).is_file():
        begun = json.loads((out_dir / PLAN_FILE).read_text())
        if begun != plan:
            changed = next(k for k in plan if begun.get(k) != plan[k])
            raise UserError(
                f"{out_dir} was begun with {changed} {begun.get(changed)!r}, not {plan[changed]!r}: "
                "run again with the same config and --samples-per-shard, or choose another --out"
            )
    else:
        _atomic_json(out_dir / PLAN_FILE, plan)
    for leftover in out_dir.glob("*.partial"):  # a shard being written when the last run stopped
        leftover.unlink()

    total = sum(s.length for s in splits)
    bar = tqdm(total=total, unit="img", desc=f"shards -> {out_dir}", disable=not progress, dynamic_ncols=True)
    info = {"name": d.dataset, "num_classes": num_classes, "splits": {}}
    for split in splits:
        order = np.random.default_rng(0).permutation(split.length) if split is splits[0] else np.arange(split.length)
        filenames: list[str] = []
        shard_lengths: list[int] = []
        shard_bytes: list[int] = []
        for first in range(0, split.length, samples_per_shard):
            chosen = order[first : first + samples_per_shard]
            filename = f"{split.name}-{first // samples_per_shard:06d}.tar"
            path = out_dir / filename
            if path.is_file():  # finished by an earlier run
                check_complete(str(path))
                length = len(scan_shard(str(path)))
            else:
                write_shard(path, split, chosen.tolist(), TarWriter)
                length = len(chosen)
            bar.update(len(chosen))
            filenames.append(filename)
            shard_lengths.append(length)
            shard_bytes.append(path.stat().st_size)
        info["splits"][split.name] = {
            "name": split.name,
            "num_samples": sum(shard_lengths),
            "filenames": filenames,
            "shard_lengths": shard_lengths,
            "shard_bytes": shard_bytes,
        }
    bar.close()
    _atomic_json(out_dir / INFO_FILE, info)
    (out_dir / PLAN_FILE).unlink()
    return info
