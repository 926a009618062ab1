"""What tests share: small configs, data writers, checks. Tests import from here, never from each other."""

import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from pfb_train.cli import main
from pfb_train.data import FASHION_MNIST_FILES
from pfb_train.selection import methods


def run_cli(*args, cwd=None, timeout=300):
    """Run `python -m pfb_train ARGS` in a subprocess; returns CompletedProcess with text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pfb_train", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def train_epoch(context, batches, epoch, tally):
    """The engine's calls for one epoch over a list of (x, y, index) batches, as train.fit makes them;
    returns the epoch's statistics."""
    from pfb_train.engine import Batch, epoch_statistics, start_epoch, train_batch

    start_epoch(context, tally, epoch, len(batches), batches[0][0].shape[0])
    for batch in batches:
        train_batch(context, Batch(*batch), tally)
    return epoch_statistics(context, tally)


def smooth_image(rng, h, w):
    """Low-frequency content, like a photo: resampling methods and JPEG decoders then agree closely."""
    coarse = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def write_smooth_folder(root, per_class, size=lambda i: (40 + 3 * i, 52)):
    """root/{train,val}/{a,b}/<i>.jpg of smooth images; `size(i)` gives (height, width)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(smooth_image(rng, *size(i))).save(root / split / c / f"{i}.jpg", quality=95)
    return rng


BATCH, SAMPLES, EPOCHS, CLASSES = 8, 64, 3, 4


# Options that make each built-in method drop something in a run this small (the defaults otherwise).
SMALL_RUN_OPTIONS = {
    "pfb": {"centres": 4, "feature_dim": 8, "ratio": 0.25},
    "random": {"ratio": 0.25},
    "infobatch": {"prune_ratio": 0.5},
    "static_random": {"drop_fraction": 0.25},
}


# Every registered method under its small-run options, and the option sets of a method that change
# what its state holds or what its hooks need (pfb by default ranks by class history: per-class
# histograms in its state, summed over ranks; stratified by label on class-conditional density:
# per-class counts in its state, labels in select and observe).
VARIANTS = {
    **{name: (name, SMALL_RUN_OPTIONS.get(name, {})) for name in methods()},
    "pfb_stratified_class": ("pfb", {**SMALL_RUN_OPTIONS["pfb"], "stratify": "label", "density": "class"}),
}


METHODS = list(VARIANTS)


def overrides(variant: str, tmp_path, name: str) -> list[str]:
    method, options = VARIANTS[variant]
    return [
        "model.name=test_resnet",
        "data.dataset=synthetic",
        "data.img_size=16",
        f"data.batch_size={BATCH}",
        f"data.train_samples={SAMPLES}",
        "data.val_samples=16",
        "data.workers=0",
        f"schedule.epochs={EPOCHS}",
        "schedule.warmup_epochs=0",
        "runtime.device=cpu",
        "runtime.progress=false",
        f"runtime.output={tmp_path}",
        f"name={name}",
        f"blocking.method={method}",
        *(f"blocking.{method}.{k}={v}" for k, v in options.items()),
    ]


def assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# Ops that read device memory on the host (values or data-dependent shapes).
SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::item",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::histc",
    "aten::repeat_interleave",
}


class HostReads(TorchDispatchMode):
    """Records the ops that would synchronise a CUDA device (plus tolist/numpy, which do not dispatch on CPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING_OPS or (name.startswith("aten::index") and _has_bool_index(args)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patched = {m: getattr(torch.Tensor, m) for m in ("tolist", "numpy")}
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, self._recording(method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    def _recording(self, method, original):
        def wrapper(tensor, *args, **kwargs):
            self.ops.append(f"Tensor.{method}")
            return original(tensor, *args, **kwargs)

        return wrapper


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def write_cifar(root, name="cifar10", n_train=20, n_test=10):
    """Files in torchvision's CIFAR layout: pickled dicts of uint8 rows and labels (str keys, as the real
    files, pickled by Python 2, read with torchvision's encoding="latin1")."""
    import pickle

    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, train, test, key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "labels",
            10,
        )
    else:
        folder, train, test, key, classes = root / "cifar-100-python", ["train"], ["test"], "fine_labels", 100
    folder.mkdir(parents=True)
    for files, n in ((train, n_train), (test, n_test)):
        for f in files:
            batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}
            with open(folder / f, "wb") as fh:
                pickle.dump(batch, fh)
    return root


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """The indices layout: 0, 0, type 0x08 (unsigned byte), rank, then big-endian sizes and the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_fashion_mnist(root, train_per_class=12, val_per_class=5, compress=True):
    """A tiny Fashion-MNIST in the standard file layout: 10 classes, class c is brightness 20*c + noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = (labels[:, None, None] * 20 + rng.integers(0, 30, (len(labels), 28, 28))).clip(0, 255)
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(root / images_name, images, compress)
        write_idx(root / labels_name, labels, compress)
    return root


def final_state(run_dir):
    return torch.load(f"{run_dir}/checkpoint-last.pt", weights_only=False)


def assert_same_training_state(a, b):
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key in ("centres", "counts"):
        assert torch.equal(a["selector"][key], b["selector"][key]), key
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]


def one_line(err: str) -> str:
    """The single `pfb-train:` line of stderr; fails on a traceback or several lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pfb-train:")]
    assert len(lines) == 1, err
    return lines[0]


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """`pfb-train ARGS` in this process (cli.main), with run_cli's result: returncode, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pfb-train", *args], code, out, err)


def folder_to_shards(folder, out, per_shard: int, *extra) -> Path:
    """`pfb-train shards` of an image folder (the demo config, no progress bar), in this process; returns `out`."""
    args = ["--set", "data.dataset=imagefolder", "--set", f"data.root={folder}", "--set", "runtime.progress=false"]
    code = main(["shards", "--config", "demo", *args, "--out", str(out), "--samples-per-shard", str(per_shard), *extra])
    assert code == 0, f"pfb-train shards of {folder} failed"
    return Path(out)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def jpeg_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "val" or c == "a" else per_class - 1):
                (root / split / c / f"{i}.jpg").write_bytes(jpeg_bytes(rng.integers(0, 255, (24, 24, 3), np.uint8)))
    return root  # train: 6 + 5 files, so one more makes 12 = 3 full batches of 4: every file is visited


TRAIN = [
    "model.name=test_resnet",
    "data.dataset=imagefolder",
    "data.img_size=16",
    "data.batch_size=4",
    "data.workers=0",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.device=cpu",
    "model.num_classes=null",
    "blocking.method=pfb",
    "blocking.pfb.centres=2",
    "blocking.pfb.ratio=0.25",
    "blocking.pfb.start_epoch=0",
    "data.mixup=0.2",
]


def train_args(root, out, *extra):
    args = ["--config", "demo"]
    for item in (*TRAIN, f"data.root={root}", f"runtime.output={out}", *extra):
        args += ["--set", item]
    return args


def wds_args(root, out, *extra):
    return train_args(root, out, "data.dataset=wds", "data.batch_size=2", *extra)  # 12 samples: all 6 steps


# from test_train_cli.py: a small run as a YAML file
TINY_YAML = """
name: tiny
model: {name: test_resnet}
blocking: {method: pfb, pfb: {ratio: 0.25, start_epoch: 1, centres: 16, feature_dim: 16},
           random: {ratio: 0.25, start_epoch: 1}}
data: {dataset: synthetic, img_size: 32, batch_size: 32, train_samples: 128, val_samples: 40, workers: 0}
optim: {lr: 0.05}
schedule: {epochs: 2, warmup_epochs: 0}
runtime: {device: cpu, seed: 0, progress: false}
"""


def jpeg(rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_dataset(per_class=8, bad=0, extra_image_column=False):
    """A Hugging Face DatasetDict of two classes of JPEG bytes (needs `datasets`)."""
    import datasets

    rng = np.random.default_rng(0)
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    if extra_image_column:
        features["mask"] = datasets.Image()

    def split(n):
        rows = {
            "image": [{"bytes": jpeg(rng), "path": None} for _ in range(2 * n)],
            "label": [i % 2 for i in range(2 * n)],
        }
        if extra_image_column:
            rows["mask"] = rows["image"]
        return datasets.Dataset.from_dict(rows, features=datasets.Features(features))

    train = split(per_class)
    if bad:
        rows = train.to_dict()
        for i in range(bad):
            rows["image"][i] = {"bytes": b"not an image", "path": None}
        train = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    return datasets.DatasetDict({"train": train, "validation": split(4)})


# What every small run on the CPU sets: generated data held in memory, no loader workers, no progress bar.
SMALL_CPU_RUN = ["data.dataset=synthetic", "data.workers=0", "runtime.progress=false", "runtime.device=cpu"]

# A small PFB run on generated data (mixup, drop-out, blocking from epoch 1): the resume and non-finite tests'.
TINY_PFB = [
    *SMALL_CPU_RUN,
    "model.name=test_resnet",
    "model.drop_rate=0.2",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=96",
    "data.val_samples=32",
    "data.mixup=0.4",
    "schedule.epochs=4",
    "schedule.warmup_epochs=1",
    "blocking.method=pfb",
    "blocking.pfb.ratio=0.25",
    "blocking.random.ratio=0.25",
    "blocking.infobatch.prune_ratio=0.25",
    "blocking.static_random.drop_fraction=0.25",
    "blocking.pfb.centres=8",
    "blocking.pfb.start_epoch=1",
    "blocking.random.start_epoch=1",
    "name=tiny",
]


def write_image_folder(root, corrupt=0):
    """8 JPEGs per class (a, b) in train/ and val/, and `corrupt` files in train/a that do not decode."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    for i in range(corrupt):
        (root / "train" / "a" / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")
    return root


IMAGE_FOLDER_RUN = [
    "model.name=test_resnet",
    "data.dataset=imagefolder",
    "data.img_size=32",
    "data.batch_size=4",
    "data.workers=0",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.device=cpu",
]
