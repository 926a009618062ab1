"""Images per second of the two ImageNet input paths, on a generated JPEG folder.

  cpu:    DataLoader workers decode with PIL and run timm's train transform (RandomResizedCrop,
          flip, normalise); the batch is moved to the device.
  device: workers only read file bytes; torchvision's batched decode_jpeg runs on the device
          (nvJPEG on a GPU), then crop, resize, flip and normalise there.

Each path runs --warmup batches, then times --batches batches (device-synchronised). The images
are smooth colour fields plus noise at ImageNet's typical size (500 x 375, JPEG quality 90), so
decode cost is realistic. It also times the device path's augmentation of one batch alone
(`augment_host_ms`: host time; `augment_ms`: to completion). Prints one JSON object.

    python scripts/bench_data.py --device cuda --workers 8 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pfb_train.config import DataConfig
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.data.device_decode import DeviceDecodeLoader


def make_folder(root: Path, images: int, classes: int = 10, size=(500, 375)) -> None:
    rng = np.random.default_rng(0)
    classes = min(classes, images)
    for i in range(images):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    for c in range(classes):  # a val/ folder is part of the layout
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48)).save(root / "val" / f"c{c}" / "v.jpg")


def images_per_second(loader, device, warmup: int, batches: int) -> float:
    set_loader_epoch(loader, 0)
    it = iter(loader)
    for _ in range(warmup):
        x, _, _ = next(it)
        x.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        x, _, _ = next(it)
        x = x.to(device, non_blocking=True)
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def augment_ms(device: torch.device, batch_size: int, img_size: int, repeats: int = 5) -> dict:
    """The device path's crop/resize/flip/normalise of one batch of decoded 500 x 375 images,
    median of `repeats`: host time (on a GPU, what launching its kernels costs the prefetch
    thread) and time to completion (device-synchronised)."""
    augment = DeviceDecodeLoader(SimpleNamespace(generator=torch.Generator().manual_seed(0)), device, img_size,
                                 train=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD).augment
    images = [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, device=device) for _ in range(batch_size)]
    host, total = [], []
    for _ in range(repeats + 1):  # the first call warms up
        sync(device)
        start = time.perf_counter()
        augment(images)
        host.append(time.perf_counter() - start)
        sync(device)
        total.append(time.perf_counter() - start)
    return {"augment_host_ms": 1e3 * statistics.median(host[1:]), "augment_ms": 1e3 * statistics.median(total[1:])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_hf_dataset(folder: Path, out: Path) -> Path:
    """The imagefolder's files, byte for byte, as a Hugging Face DatasetDict saved to `out`."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=sorted(p.name for p in (folder / "train").iterdir()))})
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((folder / split).rglob("*.jpg"))
        names = features["label"].names
        splits[name] = datasets.Dataset.from_dict(
            {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
             "label": [names.index(f.parent.name) for f in files]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--folder", help="an existing imagefolder root (default: generate one)")
    p.add_argument("--data", choices=["imagefolder", "hf"], default="imagefolder",
                   help="hf: the same JPEG bytes as a Hugging Face dataset (save_to_disk) read by data.dataset: hf")
    args = p.parse_args()
    device = torch.device(args.device)
    needed = args.batch_size * (args.warmup + args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            make_folder(root, needed)
        if args.data == "hf":
            root = as_hf_dataset(root, Path(tmp) / "hf")
        result = {"data": args.data, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"cpu x{os.cpu_count()} ({platform.machine()})", "workers": args.workers,
                  "batch_size": args.batch_size, "img_size": args.img_size, "images": needed,
                  "torch": torch.__version__}
        for decode in ("cpu", "device"):
            cfg = DataConfig(dataset=args.data, root=str(root), img_size=args.img_size,
                             batch_size=args.batch_size, workers=args.workers, decode=decode)
            train, _ = build_loaders(build_datasets(cfg), cfg, seed=0, pin_memory=device.type == "cuda", device=device)
            result[f"images_per_second_{decode}"] = images_per_second(train, device, args.warmup, args.batches)
        result.update(augment_ms(device, args.batch_size, args.img_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
