"""WebDataset shards (`data.dataset: wds`) in timm's layout, read by sample index.

`data.root` holds the `.tar` shards and `_info.json`, whose `splits.<name>` gives `filenames`,
`shard_lengths` and `num_samples`. A sample is the run of tar members sharing a key (the name up to
its first dot): an image (`jpg`, `jpeg`, `png` or `webp`) and `cls`, its class as decimal text.

Sample i of a split is position i - offset in its shard, where a shard's offset is the sum of the
lengths before it: a stable index, so InfoBatch's scores and static random blocking's draws are
kept per sample as with every other dataset. A worker indexes a shard once (its 512-byte member
headers, skipping the data) and then reads each sample's members with one `pread` each. So the
order of a whole epoch can be planned in the training process (`ShardStreamSampler`, loaders.py):

- the shards are shuffled per epoch by the run seed and laid end to end; samples that a
  sampler-level method prunes are taken out of that stream, so they are never read or decoded;
- every rank takes an equal, contiguous piece of the stream: ranks read disjoint shards and run
  the same number of steps. The remainder (fewer than ranks x batch size samples) is the end of
  that epoch's shard order, so a different few samples wait for the next epoch each time;
- within its piece a rank shuffles locally: each sample moves at most `data.shuffle_window`
  places, so the batches of a moment come from a few neighbouring shards (reads stay near each
  other, as a shuffle buffer keeps them) while the order depends on (seed, epoch, rank) alone.

Resuming inside an epoch replays the plan and skips what this rank has done: nothing is read for
it, and the order does not depend on `data.workers`, so a resume with another worker count is
exact too. Validation gives each rank a contiguous block of indices, every sample once.

The shards must be files (a local disk or a shared filesystem); `pfb-train shards` writes them
from any dataset the harness reads (pfb_train/shards.py).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from pfb_train.data.missing import Unreadable, skip_or_fail
from pfb_train.data.registry import DataSource, register, ten_classes
from pfb_train.data.splits import DataSplits, decode_stored, imagenet_stats, worker_transforms
from pfb_train.errors import UserError
from pfb_train.seeding import derive_seed

INFO_FILE = "_info.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the first one a sample has is its image
END_OF_ARCHIVE = bytes(1024)  # two zero blocks close every tar archive
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's rule: the key ends at the first dot


@dataclass(frozen=True)
class ShardSplit:
    """One split: its shard files and the number of samples in each."""

    name: str
    files: tuple[str, ...]
    lengths: tuple[int, ...]


class Sample(NamedTuple):
    key: str
    image: Optional[tuple[int, int]]  # (offset, size) of the image member's bytes in the shard
    label: Optional[tuple[int, int]]  # the same for `cls`


# ------------------------------------------------------------------ shards and _info.json


def check_complete(path: str) -> None:
    """A shard that was cut short (an interrupted copy or write) no longer ends with tar's two zero blocks."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(size - len(END_OF_ARCHIVE), 0))
        tail = f.read()
    if size % 512 or tail != END_OF_ARCHIVE:
        raise UserError(
            f"shard {path} is truncated ({size} bytes, no end-of-archive blocks): copy it again, "
            "or re-run `pfb-train shards` on its folder to finish it"
        )


class _UnusualHeader(Exception):
    """A member header the fast reader leaves to tarfile (GNU long names, sparse files, a bad checksum)."""


def _pax_records(data: bytes) -> dict:
    """A PAX extended header's 'LENGTH key=value\n' records (webdataset's writer adds one per member
    when the modification time has a fraction)."""
    records, at = {}, 0
    while at < len(data) and data[at : at + 1] != b"\0":
        length = int(data[at : data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        at += length
    return records


def _plain_members(path: str):
    """(name, data offset, size) of each regular file, from the 512-byte ustar headers alone (and
    PAX records for path and size): one pread per header, several times faster than tarfile,
    which builds a full TarInfo for each."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end, offset, pax = os.fstat(fd).st_size, 0, {}
        while offset + 512 <= end:
            header = os.pread(fd, 512, offset)
            if header == END_OF_ARCHIVE[:512]:
                return
            kind, stored_sum = header[156:157], header[148:156].rstrip(b"\0 ")
            if (
                header[257:262] != b"ustar"
                or kind in (b"g", b"L", b"K", b"S")
                or header[124] & 0x80
                or not stored_sum
                or sum(header[:148]) + 256 + sum(header[156:]) != int(stored_sum, 8)
            ):
                raise _UnusualHeader
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            data_at, offset = offset + 512, offset + 512 + (size + 511) // 512 * 512
            if kind == b"x":  # applies to the next member
                pax = _pax_records(os.pread(fd, size, data_at))
                continue
            base = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            name = (prefix + b"/" + base if prefix else base).decode("utf-8")
            if "size" in pax:
                size = int(pax["size"])
                offset = data_at + (size + 511) // 512 * 512
            if kind in (b"0", b"\0"):
                yield pax.get("path", name), data_at, size
            pax = {}
    finally:
        os.close(fd)


def _tarfile_members(path: str):
    with tarfile.open(path, "r:") as tar:  # reads the headers and seeks past the data
        for member in tar:
            if member.isfile():
                yield member.name, member.offset_data, member.size


def scan_shard(path: str) -> list[Sample]:
    """The samples of one shard, in order, from its member headers (the data is not read)."""
    try:
        try:
            members = list(_plain_members(path))
        except (_UnusualHeader, ValueError, UnicodeDecodeError):
            members = list(_tarfile_members(path))
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"shard {path} is not a readable tar file ({e})") from None
    grouped: list[tuple[str, dict, list]] = []  # (key, {extension: (offset, size)}, member names)
    for name, offset, size in members:
        match = _KEY_AND_EXTENSION.match(name)
        if match is None:
            continue
        key, extension = match.group(1), match.group(2).lower()
        if not grouped or grouped[-1][0] != key:
            grouped.append((key, {}, []))
        grouped[-1][1][extension] = (offset, size)
        grouped[-1][2].append(name)
    samples = []
    for key, found, names in grouped:
        image = next((found[k] for k in IMAGE_KEYS if k in found), None)
        if image is None or "cls" not in found:
            _check_dotted_key(path, key, names)
        samples.append(Sample(key, image, found.get("cls")))
    return samples


def _check_dotted_key(path: str, key: str, names: list) -> None:
    """A sample without an image or cls, one of whose members has a dot before an image or cls
    extension (`n01440764_10026.part1.jpg`: key `n01440764_10026`, extension `part1.jpg`), was named
    with dots in its key: every sample of the shard would stand in. One line saying why instead."""
    wanted = (*IMAGE_KEYS, "cls")
    for name in names:
        extension = name[len(key) + 1 :]
        stem, _, last = extension.rpartition(".")
        if stem and last.lower() in wanted:
            raise UserError(
                f"shard {path} has member '{name}' whose key holds a dot: WebDataset groups a sample's "
                f"members by the name up to the first dot (key '{key}', extension '{extension}'), so "
                "member names may hold one dot, before the extension; rename the files, e.g. replace the "
                f"dots in the key with underscores ('{key}_{stem.replace('.', '_')}.{last}')"
            )


def count_samples(files) -> list[int]:
    return [len(scan_shard(f)) for f in files]


def _disagreement(entry: dict, files: list[str]) -> Optional[str]:
    """What makes a split's _info.json entry untrustworthy, or None."""
    lengths = entry.get("shard_lengths")
    if (
        not isinstance(lengths, list)
        or len(lengths) != len(files)
        or not all(isinstance(n, int) and n >= 0 for n in lengths)
    ):
        return f"gives {len(files)} filenames but shard_lengths {lengths!r:.60}"
    if entry.get("num_samples") != sum(lengths):
        return f"gives num_samples {entry.get('num_samples')} but its shard_lengths add up to {sum(lengths)}"
    sizes = entry.get("shard_bytes")  # written by `pfb-train shards`: a cheap check that the files are the ones counted
    if isinstance(sizes, list) and len(sizes) == len(files):
        for f, size in zip(files, sizes):
            if os.path.getsize(f) != size:
                return f"says {Path(f).name} has {size} bytes, the file has {os.path.getsize(f)}"
    return None


def read_info(root: Path) -> Optional[dict]:
    path = root / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise UserError(
            f"{path} has no 'splits' mapping (timm's layout: splits.<name>.filenames, shard_lengths, num_samples)"
        )
    return info


def read_split(root: Path, info: Optional[dict], split: str, notes: list) -> ShardSplit:
    """The split's shards, checked; counted from the shards themselves (and said in `notes`) when
    _info.json is absent or disagrees with them."""
    if info is not None:
        if split not in info["splits"]:
            raise UserError(
                f"split '{split}' not found in {root / INFO_FILE} (it has: {', '.join(info['splits'])}); "
                "set data.train_split / data.val_split"
            )
        entry = info["splits"][split]
        files = [str(root / name) for name in entry.get("filenames", [])]
        if not files:
            raise UserError(f"split '{split}' in {root / INFO_FILE} lists no filenames")
    else:
        entry = None
        files = sorted(str(p) for p in root.glob(f"*{split}-*.tar"))
        if not files:
            raise UserError(f"split '{split}' not found in {root}: no {INFO_FILE} and no *{split}-*.tar shards")
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"shard file not found: {f} (listed in {root / INFO_FILE} for split '{split}')")
        check_complete(f)
    problem = None if entry is None else _disagreement(entry, files)
    if entry is not None and problem is None:
        return ShardSplit(split, tuple(files), tuple(entry["shard_lengths"]))
    lengths = count_samples(files)
    where = f"no {INFO_FILE} in {root}" if entry is None else f"{root / INFO_FILE} {problem}"
    notes.append(
        f"note: {where}: counted split '{split}' from its {len(files)} shard(s) instead ({sum(lengths)} samples)"
    )
    return ShardSplit(split, tuple(files), tuple(lengths))


# ------------------------------------------------------------------ the dataset


class ShardedTars(Dataset):
    """(image, label) by sample index; with `transform=None`, (encoded bytes as a uint8 tensor, label)
    for the device decoder. A sample whose image does not decode (or is missing) is `Unreadable`."""

    CACHED_SHARDS = 32  # per process: shard indexes (~100 bytes a sample) and open files

    def __init__(self, split: ShardSplit, num_classes: int, transform=None, fail: bool = False):
        self.split, self.num_classes, self.transform, self.fail = split, num_classes, transform, fail
        self.offsets = np.concatenate([[0], np.cumsum(split.lengths)]).tolist()
        self.names = _Names(self)
        self._indexes: OrderedDict = OrderedDict()  # shard number -> its samples (per process, not pickled)
        self._files: OrderedDict = OrderedDict()  # shard number -> open file descriptor

    def __getstate__(self):  # workers start with empty caches and open their own files
        return {**self.__dict__, "_indexes": OrderedDict(), "_files": OrderedDict()}

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def shard_lengths(self) -> tuple[int, ...]:
        return self.split.lengths

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of sample `index`."""
        shard = bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def _cached(self, cache: OrderedDict, shard: int, make, drop=None):
        if shard in cache:
            cache.move_to_end(shard)
            return cache[shard]
        value = cache[shard] = make(self.split.files[shard])
        if len(cache) > self.CACHED_SHARDS:
            _, old = cache.popitem(last=False)
            if drop:
                drop(old)
        return value

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        fd = self._cached(self._files, shard, lambda f: os.open(f, os.O_RDONLY), os.close)
        offset, size = where
        return os.pread(fd, size, offset)

    def encoded(self, index: int) -> Union[tuple[bytes, int], Unreadable]:
        """(image bytes, label) of sample `index`, or an Unreadable saying why not."""
        shard, position = self.locate(index)
        samples = self._cached(self._indexes, shard, scan_shard)
        name = self.names[index]
        if position >= len(samples):
            return Unreadable(
                name, f"the shard holds {len(samples)} samples, {INFO_FILE} says {self.split.lengths[shard]}"
            )
        sample = samples[position]
        if sample.image is None or sample.label is None:
            return Unreadable(name, "no image member" if sample.image is None else "no cls member")
        try:
            label = int(self._read(shard, sample.label).decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return Unreadable(name, "cls is not an integer")
        if not 0 <= label < self.num_classes:
            raise UserError(
                f"sample {name} has label {label}, outside 0..{self.num_classes - 1} "
                f"(model.num_classes {self.num_classes})"
            )
        data = self._read(shard, sample.image)
        if len(data) != sample.image[1]:
            return Unreadable(name, "the image member is cut short")
        return data, label

    def __getitem__(self, index: int):
        found = self.encoded(index)
        if isinstance(found, Unreadable):  # nothing to decode
            found = skip_or_fail(found.path, found.reason, self.fail)
            # the device decoder counts empty bytes as unreadable; the CPU loader's collate, an Unreadable
            return found if self.transform is not None else (torch.empty(0, dtype=torch.uint8), 0)
        data, label = found
        return decode_stored(data, label, self.names[index], self.transform, self.fail)


class _Names:
    """`names[i]` -> 'SHARD.tar[position]', without a list of a million strings."""

    def __init__(self, dataset: ShardedTars):
        self.dataset = dataset

    def __getitem__(self, index: int) -> str:
        shard, position = self.dataset.locate(index)
        return f"{self.dataset.split.files[shard]}[{position}]"

    def __len__(self) -> int:
        return len(self.dataset)


def wds(
    root: str,  # set: the source needs_root
    train_split: str,
    val_split: str,
    num_classes: Optional[int],
    img_size: int,
    auto_augment=None,
    fail_on_bad: bool = False,
    decode: str = "cpu",
) -> DataSplits:
    """The train and validation splits of the shards in `root` (see the module). `num_classes`
    (model.num_classes) must be set when _info.json does not say, and agree with it when it does;
    else a one-line UserError."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"data.root does not exist: {base} (data.dataset 'wds': a folder of .tar shards and {INFO_FILE})"
        )
    info = read_info(base)
    notes: list = []
    train, val = (read_split(base, info, split, notes) for split in (train_split, val_split))
    stated = (info or {}).get("num_classes")
    if num_classes is None and stated is None:
        raise UserError(f"set model.num_classes: {base} does not say how many classes its shards hold")
    if num_classes is not None and stated is not None and num_classes != stated:
        raise UserError(
            f"config key 'model.num_classes' is {num_classes} but {base / INFO_FILE} gives num_classes {stated}"
        )
    num_classes = num_classes or stated
    assert num_classes is not None  # one of them is set, checked above
    on_device = decode != "cpu"  # device, dali: workers read the stored bytes
    train_tf, val_tf = (None, None) if on_device else worker_transforms(img_size, auto_augment)
    return DataSplits(
        ShardedTars(train, num_classes, train_tf, fail_on_bad),
        ShardedTars(val, num_classes, val_tf, fail_on_bad),
        num_classes,
        decode_on_device=on_device,
        notes=tuple(notes),
        **({} if on_device else imagenet_stats()),
    )


# ------------------------------------------------------------------ the epoch's order


def shard_stream(lengths, seed: int, epoch: int) -> np.ndarray:
    """Every sample index, shard after shard, the shards in this epoch's order (the same on every rank)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = torch.randperm(
        len(lengths), generator=torch.Generator().manual_seed(derive_seed("shards", seed, epoch))
    ).tolist()
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in order])


def local_shuffle(count: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of range(count) that moves no item more than `window` places: sort the
    positions jittered by up to `window`. Like a shuffle buffer of that size, with no state."""
    jitter = torch.rand(count, generator=generator, dtype=torch.float64) * window
    return torch.argsort(torch.arange(count, dtype=torch.float64) + jitter, stable=True)


def stated_classes(d) -> int:
    """The class count _info.json gives (what `pfb-train info` shows), else ten_classes's."""
    try:
        info = read_info(Path(d.root).expanduser()) if d.root else None
    except UserError:  # a damaged _info.json is reported when the run reads it
        info = None
    stated = (info or {}).get("num_classes")
    return stated if isinstance(stated, int) else ten_classes(d)


register(
    DataSource(
        "wds",
        build=lambda d, num_classes, seed: wds(
            d.root,
            d.train_split,
            d.val_split,
            num_classes,
            d.img_size,
            d.auto_augment,
            d.bad_images == "fail",
            d.decode,
        ),
        summary="WebDataset .tar shards with timm's _info.json in data.root (`pfb-train shards` writes them), "
        "for shared storage",
        samples="stored",
        imbalance=False,
        decodes=("cpu", "device", "dali"),
        needs_root=True,
        options=("root", "train_split", "val_split", "shuffle_window", "bad_images"),
        num_classes=stated_classes,
    )
)
