"""Training throughput of the harness end to end: full data vs a blocking method vs a plain loop.

Runs the harness itself (`pfb_train.train.run`: data loader, prefetch, selection, logging,
checkpoints) for full data and then for `--method` on the same data, and reports images/s of
the steady-state epochs (epoch 0 is left out: worker start-up, cuDNN autotuning, first-batch
allocation) and the wall-clock ratio of the two. `--reference` adds the plain loop of
scripts/bench_reference.py (same timm model and optimizer, autocast, channels_last, a fixed
batch on the device) at the same batch and precision.

  --data synthetic   the synthetic dataset: float tensors in host memory, nothing to decode
  --data jpeg        a generated JPEG folder (500 x 375, as bench_data.py) read through the
                     real imagefolder pipeline, decoded as `--decode cpu|device|dali` says

Prints one JSON object on stdout (the harness's own lines go to stderr).

    python scripts/bench_train.py --model resnet50 --batch-size 256 --amp bf16 --channels-last --reference
    python scripts/bench_train.py --data jpeg --decode dali --workers 8 ...

Flat fields for tables: images_per_second_none / _<method>, time_ratio, data_wait_share (the
full-data run's share of wall-clock spent waiting for the next batch) and data_wait_share_<method>.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import timm
import torch

from bench_data import make_folder
from bench_reference import device_name, reference_rate
from pfb_train.config import load_config
from pfb_train.run_dir import read_metrics
from pfb_train.train import run

JPEG_CLASSES = 10


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; all but the first are timed")
    p.add_argument("--method", choices=["pfb", "random"], default="pfb")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--stage", default="1")
    p.add_argument("--mode", choices=["auto", "reuse", "recompute"], default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--data", choices=["synthetic", "jpeg"], default="synthetic")
    p.add_argument(
        "--decode", choices=["cpu", "device", "dali"], default="cpu", help="--data jpeg: where JPEGs are decoded"
    )
    p.add_argument("--compile", action="store_true", help="runtime.compile=true for both runs")
    p.add_argument("--folder", help="--data jpeg: an existing imagefolder root (default: generate one)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=1000, help="--data synthetic: classes (the head's size)")
    p.add_argument("--reference", action="store_true", help="also time the plain reference loop")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for both runs, e.g. runtime.check_finite=false",
    )
    return p.parse_args()


def steady_state(run_dir: str) -> dict:
    """Totals over the epochs after the first."""
    timed = read_metrics(run_dir)[1:]
    seconds = sum(r["epoch_seconds"] for r in timed)
    seen = sum(r["samples_seen"] for r in timed)
    return {
        "images_per_second": seen / seconds,
        "epoch_seconds": [round(r["epoch_seconds"], 3) for r in timed],
        "seconds": seconds,
        "blocked_fraction": sum(r["samples_blocked"] for r in timed) / seen,
        "selection_share": sum(r["selection_seconds"] for r in timed) / seconds,
        "data_share": sum(r["data_seconds"] for r in timed) / seconds,
    }


def main() -> None:
    args = parse_args()
    samples = args.batch_size * args.steps_per_epoch
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "jpeg":
            root = Path(args.folder) if args.folder else Path(tmp) / "images"
            if not args.folder:
                make_folder(root, samples, classes=JPEG_CLASSES)
            data = ["data.dataset=imagefolder", f"data.root={root}", f"data.decode={args.decode}"]
        else:
            data = [
                "data.dataset=synthetic",
                f"data.train_samples={samples}",
                f"data.val_samples={args.batch_size}",
                f"model.num_classes={args.num_classes}",
            ]
        common = [
            f"model.name={args.model}",
            f"data.img_size={args.img_size}",
            f"data.batch_size={args.batch_size}",
            f"data.workers={args.workers}",
            "optim.lr=0.01",
            f"schedule.epochs={args.epochs}",
            "schedule.warmup_epochs=0",
            f"runtime.device={args.device}",
            f"runtime.amp={args.amp}",
            f"runtime.channels_last={str(args.channels_last).lower()}",
            f"runtime.output={tmp}/runs",
            "runtime.progress=false",
            f"runtime.eval_every={args.epochs}",
            f"blocking.stage={args.stage}",
            f"blocking.mode={args.mode}",
            f"runtime.compile={str(args.compile).lower()}",
            *data,
        ]
        blocking = {
            "none": ["blocking.method=none"],
            args.method: [
                f"blocking.method={args.method}",
                f"blocking.{args.method}.ratio={args.ratio}",
                f"blocking.{args.method}.start_epoch=0",
            ]
            + ([f"blocking.pfb.centres={min(64, args.batch_size)}"] if args.method == "pfb" else []),
        }
        runs = {}
        for method, options in blocking.items():
            cfg = load_config(None, [*common, *options, f"name={method}", *args.overrides])
            with contextlib.redirect_stdout(sys.stderr):  # the harness's epoch lines; stdout is the JSON
                summary = run(cfg)
            runs[method] = {**steady_state(summary["run_dir"]), "top1": summary["top1"]}

    result = {
        "model": args.model,
        "data": args.data,
        "decode": args.decode if args.data == "jpeg" else None,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "workers": args.workers,
        "steps_per_epoch": args.steps_per_epoch,
        "timed_epochs": args.epochs - 1,
        "method": args.method,
        "ratio": args.ratio,
        "overrides": args.overrides,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "none": runs["none"],
        args.method: runs[args.method],
        "time_ratio": runs[args.method]["seconds"] / runs["none"]["seconds"],
        "images_per_second_none": runs["none"]["images_per_second"],
        f"images_per_second_{args.method}": runs[args.method]["images_per_second"],
        "data_wait_share": runs["none"]["data_share"],
        f"data_wait_share_{args.method}": runs[args.method]["data_share"],
    }
    if args.reference:
        ref = reference_rate(
            args.model,
            args.device,
            args.batch_size,
            args.img_size,
            args.amp,
            args.channels_last,
            JPEG_CLASSES if args.data == "jpeg" else args.num_classes,
            steps=args.steps_per_epoch,
        )
        result["reference"] = ref
        result["baseline_vs_reference"] = runs["none"]["images_per_second"] / ref["images_per_second"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
