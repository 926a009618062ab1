"""Images per second of the two ImageNet input paths and three data layouts, on the same JPEG bytes.

Layouts (--data, comma-separated, measured in one process, alternated for --rounds rounds):
  imagefolder: the generated folder of .jpg files;
  hf:          the same bytes as a Hugging Face dataset (save_to_disk), data.dataset: hf;
  wds:         the same bytes as WebDataset shards written by `pfb-train shards`, data.dataset: wds.

  cpu:    DataLoader workers decode with PIL and run timm's train transform (RandomResizedCrop,
          flip) and ship uint8; the batch is moved to the device and normalised there.
  device: workers only read file bytes; torchvision's batched decode_jpeg runs on the device
          (nvJPEG on a GPU), then crop, resize, flip and normalise there.
  dali:   workers read file bytes and image sizes; NVIDIA DALI decodes the crop's region
          (`mixed` on a GPU, its CPU operators without one), resizes, flips and normalises.
          --decode chooses the paths (comma-separated; default all three).

Each path runs --warmup batches, then times --batches batches (device-synchronised). The images
are smooth colour fields plus noise at ImageNet's typical size (500 x 375, JPEG quality 90), so
decode cost is realistic. `worker_cpu_s_per_image` is the CPU time the DataLoader workers spent
(user + system, read from /proc) per timed image; `main_cpu_s_per_image` the training process's
own (all its threads: DALI's, the prefetcher's); `bytes_per_batch` what the workers hand over per
batch (uint8 pixels on the cpu path, file bytes on the others). It also times the device path's
augmentation of one batch alone (`augment_host_ms`: host time; `augment_ms`: to completion).
Prints one JSON object.

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
from torch.utils.data import DataLoader
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


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live children (the DataLoader workers); Linux only."""
    total, me = 0, str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that just ended
            continue
        if fields[1] == me:  # fields after the name: state, ppid, ..., utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(loader, device, warmup: int, batches: int) -> tuple[float, float, float]:
    """(images per second, workers' and the training process's CPU seconds per image) over `batches`
    batches after `warmup`."""
    set_loader_epoch(loader, 0)
    it = iter(loader)
    for _ in range(warmup):
        x, _, _ = next(it)
        x.to(device, non_blocking=True)
    sync(device)
    start, cpu_start, count = time.perf_counter(), children_cpu_seconds(), 0
    main_start = time.process_time()
    for _ in range(batches):
        x, _, _ = next(it)
        x = x.to(device, non_blocking=True)
        count += x.shape[0]
    sync(device)
    seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_start
    main_cpu = time.process_time() - main_start
    del it  # the workers end with the iterator
    return count / seconds, cpu / count, main_cpu / count


def shipped_bytes(loader) -> int:
    """Bytes of one batch as the DataLoader workers hand it to the training process: uint8 images on
    the cpu path, encoded files on the device paths (labels and indices included)."""
    while not isinstance(loader, DataLoader):  # the wrappers (normalising, decoding) hold the DataLoader
        loader = loader.loader
    batch = next(iter(loader))
    tensors = [t for part in batch for t in (part if isinstance(part, (list, tuple)) else [part])]
    return sum(t.numel() * t.element_size() for t in tensors)


def augment_ms(device: torch.device, batch_size: int, img_size: int, repeats: int = 5) -> dict:
    """The device path's crop/resize/flip/normalise of one batch of decoded 500 x 375 images,
    median of `repeats`: host time (on a GPU, what launching its kernels costs the prefetch
    thread) and time to completion (device-synchronised)."""
    augment = DeviceDecodeLoader(
        SimpleNamespace(generator=torch.Generator().manual_seed(0)),
        device,
        img_size,
        train=True,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    ).augment
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

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=sorted(p.name for p in (folder / "train").iterdir())),
        }
    )
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((folder / split).rglob("*.jpg"))
        names = features["label"].names
        splits[name] = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                "label": [names.index(f.parent.name) for f in files],
            },
            features=features,
        )
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def layout_root(name: str, folder: Path, tmp: Path) -> Path:
    if name == "hf":
        return as_hf_dataset(folder, tmp / "hf")
    if name == "wds":
        from pfb_train.shards import write_shards

        write_shards(
            DataConfig(dataset="imagefolder", root=str(folder), val_split="validation"),
            str(tmp / "wds"),
            samples_per_shard=256,
            progress=False,
        )
        return tmp / "wds"
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="each layout and path is measured once a round")
    p.add_argument("--folder", help="an existing imagefolder root (default: generate one)")
    p.add_argument("--data", default="imagefolder,hf,wds", help="layouts to compare, comma-separated")
    p.add_argument("--decode", default="cpu,device,dali", help="decode paths to compare, comma-separated")
    args = p.parse_args()
    device = torch.device(args.device)
    layouts, decodes = args.data.split(","), args.decode.split(",")
    needed = args.batch_size * (args.warmup + args.batches)
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{os.cpu_count()} ({platform.machine()})",
        "workers": args.workers,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "images": needed,
        "rounds": args.rounds,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "folder"
        if not args.folder:
            make_folder(folder, needed)
        roots = {name: layout_root(name, folder, Path(tmp)) for name in layouts}
        rows = {f"{name}_{decode}": [] for name in layouts for decode in decodes}
        shipped = {}  # bytes per batch from the workers, per path
        for _ in range(args.rounds):
            for name in layouts:
                for decode in decodes:
                    cfg = DataConfig(
                        dataset=name,
                        root=str(roots[name]),
                        img_size=args.img_size,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        decode=decode,
                    )
                    splits = build_datasets(cfg, num_classes=len(list((folder / "train").iterdir())))
                    train, _ = build_loaders(splits, cfg, seed=0, pin_memory=device.type == "cuda", device=device)
                    rows[f"{name}_{decode}"].append(measure(train, device, args.warmup, args.batches))
                    shipped.setdefault(f"{name}_{decode}", shipped_bytes(train))
        for key, values in rows.items():
            result[f"images_per_second_{key}"] = [round(v[0], 1) for v in values]
            result[f"worker_cpu_s_per_image_{key}"] = [round(v[1], 5) for v in values]
            result[f"main_cpu_s_per_image_{key}"] = [round(v[2], 5) for v in values]
            result[f"bytes_per_batch_{key}"] = shipped[key]
        result.update(augment_ms(device, args.batch_size, args.img_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
