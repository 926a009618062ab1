"""An in-memory dataset served two ways: DataLoader workers with per-item transforms, or resident.

  loader:   the DataLoader path, torchvision's per-item transforms (crop, flip, normalise) in
            --workers workers (0: in the training process); what in-memory datasets used
            before resident augmentation, and still use where they do not fit.
  resident: the dataset held on the training device, each batch one gather there with the
            crops and flips of the whole batch and its normalisation (pfb_train/data/resident.py).

Two measurements, each path in turn for --rounds rounds:
  serve: one pass over the training loader alone, no model (`serve_seconds_<path>`: seconds per
         epoch, `serve_images_per_second_<path>`);
  train: `pfb_train.train.run` of the config for --epochs epochs (0: skipped); the epochs after the
         first are reported: `epoch_seconds_<path>`, and `data_seconds_<path>`, the time the
         training loop waited for its batches.
The loader path is forced by making build_loaders see a dataset that does not fit on the device.
Prints one JSON object (the harness's own lines go to stderr).

    python scripts/bench_resident.py --config fashion_mnist --device cpu --workers 0,2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from unittest import mock

import torch

import pfb_train.data.loaders as loaders
from pfb_train.config import load_config
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.run_dir import read_metrics
from pfb_train.train import run


@contextmanager
def path(name: str):
    """Within it, build_loaders takes the named path for in-memory datasets."""
    if name == "resident":
        yield
    else:
        with mock.patch.object(loaders, "fits_on_device", lambda dataset, device: False):
            yield


def serve_seconds(cfg, device: torch.device) -> tuple[float, int]:
    """(seconds, images) of one pass over the training loader, the first batch included."""
    splits = build_datasets(cfg.data, cfg.model.num_classes, seed=cfg.runtime.seed)
    train, _ = build_loaders(splits, cfg.data, cfg.runtime.seed, device=device)
    set_loader_epoch(train, 0)
    start, images = time.perf_counter(), 0
    for x, _, _ in train:
        images += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, images


def train_seconds(cfg_path: str, overrides: list, out: str) -> tuple[list, list]:
    """(epoch seconds, data seconds) of the epochs after the first of one run."""
    with redirect_stdout(sys.stderr):  # the harness's own lines: stdout keeps the one JSON object
        summary = run(load_config(cfg_path, [*overrides, f"runtime.output={out}", "runtime.progress=false"]))
    timed = read_metrics(summary["run_dir"])[1:]
    return [round(r["epoch_seconds"], 2) for r in timed], [round(r["data_seconds"], 3) for r in timed]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default="0,2", help="DataLoader workers of the loader path, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="training epochs per run (all but the first timed); 0: none")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    device = torch.device(args.device)
    base = [*args.overrides, f"runtime.device={device.type}"]
    paths = [(f"loader_w{w}", "loader", [f"data.workers={w}"]) for w in args.workers.split(",")]
    paths.append(("resident", "resident", []))
    cfg = load_config(args.config, base)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "dataset": cfg.data.dataset,
        "batch_size": cfg.data.batch_size,
        "img_size": cfg.data.img_size,
        "epochs": args.epochs,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{os.cpu_count()} ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for key, name, extra in paths:
                with path(name):
                    seconds, images = serve_seconds(load_config(args.config, [*base, *extra]), device)
                    row = rows.setdefault(
                        key,
                        {"serve_seconds": [], "serve_images_per_second": [], "epoch_seconds": [], "data_seconds": []},
                    )
                    row["serve_seconds"].append(round(seconds, 3))
                    row["serve_images_per_second"].append(round(images / seconds, 1))
                    if args.epochs:
                        epochs, data = train_seconds(
                            args.config, [*base, *extra, f"schedule.epochs={args.epochs}", f"name={key}_r{r}"], tmp
                        )
                        row["epoch_seconds"] += epochs
                        row["data_seconds"] += data
    for key, row in rows.items():
        for field, values in row.items():
            if values:
                result[f"{field}_{key}"] = values
    print(json.dumps(result))


if __name__ == "__main__":
    main()
