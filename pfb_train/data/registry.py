"""Data sources by name, the way selection methods are found (selection/registry.py). A source is one
module that declares a `DataSource` and registers it.

A source declares:
- `name`: the value of `data.dataset`;
- `build(data_cfg, num_classes, seed)`: its `DataSplits` (splits.py); `num_classes` is
  model.num_classes (None: the source's own count), `seed` the run seed;
- `summary`: one line for `pfb-train datasets`;
- `samples`: what `data.train_samples` / `data.val_samples` do: `subset`, a fixed class-stratified
  subset taken after `build` (subsets.py); `size`, the source makes that many itself; `stored`, they
  do not apply (read as stored);
- `imbalance`: whether `data.imbalance` (a long-tailed training subset) applies;
- `decodes`: the `data.decode` paths it takes: ("cpu",), or ("cpu", "device", "dali") for sources of
  stored image bytes;
- `needs_root`: whether `data.root` must be set; `options`: the `data.*` keys it reads beyond the
  common ones (img_size, batch sizes, workers, augmentation), for the listing;
- `num_classes(data_cfg)`: its class count without reading the data (what `pfb-train info` uses when
  model.num_classes is not set);
- `encode(data_cfg)`: its splits as stored images, `(list[EncodedSplit], num_classes)` (encoded.py),
  what `pfb-train shards` writes; None: nothing stored to write.

Registration is one line in the source's module (`register(DataSource(...))`), or an entry point in the
`pfb_train.datasets` group, so a source can live in another package:

    [options.entry_points]
    pfb_train.datasets =
        my_source = my_package.my_module      # importing the module registers the source

Nothing outside a source's module names it: config, build_datasets, info and shards ask this registry.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pfb_train.errors import UserError
from pfb_train.plugins import Registry

SAMPLES = ("subset", "size", "stored")
DECODES = ("cpu", "device", "dali")
ENTRY_POINT_GROUP = "pfb_train.datasets"


def ten_classes(data_cfg) -> int:
    """The class count a source that does not know its own in advance reports to `pfb-train info`."""
    return 10


@dataclass(frozen=True)
class DataSource:
    """One data source: what `data.dataset: <name>` reads and which `data.*` keys apply (see the module).
    Raises ValueError when made with a `samples` or `decodes` outside the choices."""

    name: str
    build: Callable[[Any, Optional[int], int], Any]  # (data_cfg, num_classes or None, seed) -> DataSplits
    summary: str = ""
    samples: Literal["subset", "size", "stored"] = "subset"
    imbalance: bool = True
    decodes: tuple[str, ...] = ("cpu",)
    needs_root: bool = False
    options: tuple[str, ...] = ()  # data.* keys it reads, e.g. ("root", "download")
    num_classes: Callable[[Any], int] = ten_classes  # data_cfg -> class count, read without the data
    encode: Optional[Callable[[Any], tuple[list, int]]] = None  # data_cfg -> ([EncodedSplit, ...], num_classes)

    def __post_init__(self):
        if self.samples not in SAMPLES:
            raise ValueError(f"data source {self.name!r}: samples must be one of {SAMPLES}, got {self.samples!r}")
        if not self.decodes or "cpu" not in self.decodes or set(self.decodes) - set(DECODES):
            raise ValueError(
                f"data source {self.name!r}: decodes must include 'cpu' and be among {DECODES}, got {self.decodes!r}"
            )
        if self.imbalance and self.samples != "subset":
            raise ValueError(f"data source {self.name!r}: imbalance needs samples='subset' (it is a subset)")


_REGISTRY = Registry("data source", ENTRY_POINT_GROUP)
register, unregister = _REGISTRY.register, _REGISTRY.unregister


def sources() -> dict[str, DataSource]:
    """Every registered source, by name (built-ins first, in the order pfb_train/data/__init__ imports
    them, then plug-ins)."""
    return _REGISTRY.all()


def get_source(name: str) -> DataSource:
    """The source `data.dataset` names; an unknown name is a one-line UserError listing the registered ones."""
    known = sources()
    if name not in known:
        close = difflib.get_close_matches(str(name), list(known), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"config key 'data.dataset': unknown dataset '{name}' ({hint}choose one of: "
            f"{', '.join(known)}; `pfb-train datasets` describes them)"
        )
    return known[name]
