"""Unreadable samples: batches keep their size.

An unreadable file becomes an `Unreadable` item; collation replaces it by a readable item of the same
batch whose index is negative (a stand-in): `stand_in_index` of the unreadable sample's own index, so
the run can name the file. Shapes never change (mixup, DDP, InfoBatch's gathers,
compiled graphs, resume offsets); stand-ins get zero weight in the loss, are left out of the
selector's update (except PFB's class histories inside a blocking window: `select` sees no indices)
and of every count, and are counted as `bad_samples`. A batch with no readable
item at all stops the run, naming a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pfb_train.errors import UserError


def stand_in_index(index):
    """The index a stand-in row carries for unreadable sample `index` (an int or an int64 tensor): -1 - index,
    negative (the row holds no sample) and naming the sample (`unreadable_index` undoes it)."""
    return -1 - index


unreadable_index = stand_in_index  # its own inverse: -1 - (-1 - i) = i


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a sample whose file could not be read (`index`: its dataset index, once known)."""

    path: Optional[str]  # None: the decoder names the sample (device_decode.collate_bytes)
    reason: str
    index: int = 0


def skip_or_fail(path, reason: str, fail: bool) -> Unreadable:
    """An unreadable sample's stand-in or, with `data.bad_images: fail`, a one-line error."""
    if fail:
        raise UserError(f"unreadable image {path} ({reason}); set data.bad_images=skip to stand in for such images")
    return Unreadable(path, reason)


def all_unreadable(count: int, path) -> str:
    return (
        f"all {count} images of a batch are unreadable, e.g. {path}: check the files under data.root "
        "(data.bad_images=skip stands in for single files, not whole batches)"
    )


def fill_unreadable(items: list, copy_item) -> list:
    """`items` with each Unreadable `bad` replaced by `copy_item(readable item, bad)` (a stand-in whose index
    is `stand_in_index(bad.index)`)."""
    bad = [item for item in items if isinstance(item, Unreadable)]
    if not bad:
        return items
    readable = [item for item in items if not isinstance(item, Unreadable)]
    if not readable:
        raise UserError(all_unreadable(len(items), bad[0].path))
    spare = iter(readable * len(bad))
    return [copy_item(next(spare), item) if isinstance(item, Unreadable) else item for item in items]


def stand_in_rows(good: torch.Tensor) -> torch.Tensor:
    """(n,) int64 row each row of a batch takes its content from: itself where `good` (bool, (n,)),
    else the readable rows in turn (the stand-ins). Needs at least one good row."""
    source = torch.arange(len(good))
    readable = good.nonzero().flatten()
    bad = int((~good).sum())
    source[~good] = readable.repeat(bad // len(readable) + 1)[:bad]
    return source
