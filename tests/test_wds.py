"""`data.dataset: wds` and `pfb-train shards`: shards written in the test from a folder of real JPEGs
(no network); every method, the epoch plan, exact resume, 2 gloo processes, timm reading them."""

import filecmp
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfb_train.cli import main
from pfb_train.config import load_config
from pfb_train.data.loaders import ShardStreamSampler
from pfb_train.data.wds import local_shuffle, shard_stream
from pfb_train.distributed import DistInfo
from pfb_train.run_dir import read_metrics
from pfb_train.selection import methods
from pfb_train.train import fit, setup
from helpers import folder_to_shards, SMALL_RUN_OPTIONS, assert_equal, write_smooth_folder

pytest.importorskip("webdataset")
HERE = Path(__file__).resolve().parent
PER_SHARD = 4  # 18 samples a split: shards of 4, 4, 4, 4 and 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "folder"
    write_smooth_folder(root, per_class=9)
    return root


@pytest.fixture(scope="module")
def shards(folder):
    return folder_to_shards(folder, folder.parent / "shards", PER_SHARD)


def overrides(root, out, method="pfb", *extra):
    return [
        "model.name=test_resnet",
        "model.num_classes=null",
        "data.dataset=wds",
        f"data.root={root}",
        "data.img_size=16",
        "data.batch_size=4",
        "data.workers=0",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "runtime.device=cpu",
        "runtime.progress=false",
        f"runtime.output={out}",
        f"blocking.method={method}",
        *(f"blocking.{method}.{k}={v}" for k, v in SMALL_RUN_OPTIONS.get(method, {}).items()),
        *extra,
    ]


def test_shards_hold_the_original_bytes_in_timms_layout(folder, shards):
    info = json.loads((shards / "_info.json").read_text())
    train = info["splits"]["train"]
    assert info["num_classes"] == 2 and train["num_samples"] == 18 and train["shard_lengths"] == [4, 4, 4, 4, 2]
    assert info["splits"]["validation"]["filenames"][-1] == "validation-000004.tar"
    import tarfile

    files = sorted(str(p) for p in (folder / "train").rglob("*.jpg"))  # ImageFolder's order: the keys
    with tarfile.open(shards / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == PER_SHARD
    for key in keys:  # the JPEG bytes as they were, and the class as text
        assert members[f"{key}.jpg"] == Path(files[int(key)]).read_bytes()
        assert members[f"{key}.cls"] == (b"0" if "/a/" in files[int(key)] else b"1")


def test_timm_reads_the_shards(folder, shards):
    from timm.data import create_dataset

    dataset = create_dataset("wds/shards", root=str(shards), split="validation", is_training=False)
    got = sorted((label, image.tobytes()) for image, label in dataset)
    files = sorted((folder / "val").rglob("*.jpg"))
    want = sorted((0 if p.parent.name == "a" else 1, Image.open(p).convert("RGB").tobytes()) for p in files)
    assert got == want


def test_a_half_written_folder_is_finished_with_the_same_bytes(folder, shards, tmp_path, capsys, monkeypatch):
    import webdataset

    written = []
    original = webdataset.TarWriter.write

    def write_then_stop(self, sample):
        if len(written) == 9:  # inside the third shard
            raise KeyboardInterrupt
        written.append(sample["__key__"])
        return original(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", write_then_stop)
    assert (
        main(
            [
                "shards",
                "--config",
                "demo",
                "--set",
                "data.dataset=imagefolder",
                "--set",
                f"data.root={folder}",
                "--set",
                "runtime.progress=false",
                "--out",
                str(tmp_path / "half"),
                "--samples-per-shard",
                "4",
            ]
        )
        == 130
    )
    half = tmp_path / "half"
    assert not (half / "_info.json").exists() and (half / "train-000002.tar.partial").exists()
    assert sorted(p.name for p in half.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.undo()
    assert (
        main(
            [
                "shards",
                "--config",
                "demo",
                "--set",
                "data.dataset=imagefolder",
                "--set",
                f"data.root={folder}",
                "--out",
                str(half),
                "--samples-per-shard",
                "5",
            ]
        )
        == 2
    )
    assert "was begun with samples_per_shard 4, not 5" in capsys.readouterr().err
    folder_to_shards(folder, half, PER_SHARD)
    assert sorted(p.name for p in half.iterdir()) == sorted(p.name for p in shards.iterdir())
    for name in (p.name for p in shards.iterdir()):
        assert filecmp.cmp(half / name, shards / name, shallow=False), name
    assert (
        main(
            [
                "shards",
                "--config",
                "demo",
                "--set",
                f"data.root={folder}",
                "--set",
                "data.dataset=imagefolder",
                "--out",
                str(half),
            ]
        )
        == 0
    )
    assert "already complete" in capsys.readouterr().out  # a finished folder: nothing to do


@pytest.mark.parametrize("method", list(methods()))
def test_every_method_trains_on_shards(method, shards, tmp_path):
    state = setup(load_config(None, overrides(shards, tmp_path, method)), DistInfo())
    records = read_metrics(fit(state)["run_dir"])
    assert state.net.num_classes == 2  # from _info.json
    assert len(records) == 2 and all(r["val_samples"] == 18 for r in records)
    # 4 steps of 4 every epoch (2 samples sit out); a sampler-level method prunes from those 16
    assert all(r["samples_seen"] + r["samples_pruned"] == 16 and r["bad_samples"] == 0 for r in records)


def test_device_decode_reads_the_stored_bytes(shards, tmp_path):
    state = setup(load_config(None, overrides(shards, tmp_path, "pfb", "data.decode=device")), DistInfo())
    assert read_metrics(fit(state)["run_dir"])[-1]["samples_seen"] == 16


def test_resume_inside_an_epoch_is_exact_with_another_worker_count(shards, tmp_path):
    def train(name, workers, resume=False, **until):
        extra = [
            f"name={name}",
            "data.mixup=0.2",
            f"data.workers={workers}",
            *(["runtime.resume=auto"] if resume else []),
        ]
        state = setup(load_config(None, overrides(shards, tmp_path, "infobatch", *extra)), DistInfo())
        fit(state, **until)
        return state

    whole = train("whole", workers=2)
    train("cut", workers=2, until_step=6)  # inside epoch 1 (4 steps per epoch)
    resumed = train("cut", workers=1, resume=True)
    assert_equal(whole.net.state_dict(), resumed.net.state_dict(), "model")
    assert_equal(whole.selector.state_dict(), resumed.selector.state_dict(), "selector")


# ---------------------------------------------------------------- the epoch plan


LENGTHS = [5, 3, 7, 1, 4, 6]  # 26 samples in uneven shards


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("pruned", [False, True])
def test_every_rank_gets_an_equal_piece_and_the_rest_ends_the_stream(world_size, pruned):
    subset = torch.tensor([i for i in range(26) if i % 4]) if pruned else None  # 19 kept
    pieces = []
    for rank in range(world_size):
        sampler = ShardStreamSampler(LENGTHS, batch_size=3, window=4, rank=rank, world_size=world_size, seed=7)
        sampler.set_epoch(2, subset)
        pieces.append([index for index, _ in sampler])
        assert len(pieces[-1]) == len(sampler)
    pool = 19 if pruned else 26
    share = pool // (3 * world_size) * 3
    assert all(len(piece) == share for piece in pieces)  # equal steps on every rank
    stream = shard_stream(LENGTHS, 7, 2).tolist()
    if pruned:
        stream = [i for i in stream if i % 4]
    seen = sum(pieces, [])
    assert len(set(seen)) == len(seen) and sorted(seen) == sorted(stream[: world_size * share])
    for rank, piece in enumerate(pieces):  # a contiguous piece of the stream: ranks read disjoint shards
        assert sorted(piece) == sorted(stream[rank * share : (rank + 1) * share])


def test_the_plan_depends_on_seed_and_epoch_and_skips_what_was_done():
    def keys(epoch, skip=0, seed=0):
        sampler = ShardStreamSampler(LENGTHS, batch_size=2, window=3, seed=seed)
        sampler.set_epoch(epoch, None, skip)
        return list(sampler)

    assert keys(0) == keys(0) and keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert keys(1, skip=6) == keys(1)[6:]


def test_local_shuffle_moves_nothing_further_than_the_window():
    order = local_shuffle(1000, 16, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(1000))
    displacement = (order - torch.arange(1000)).abs()
    assert displacement.max() <= 16 and displacement.float().mean() > 2


# ---------------------------------------------------------------- two processes


@pytest.mark.distributed
def test_two_gloo_processes_on_uneven_shards(shards, tmp_path):
    out = {}
    for nproc in (1, 2):
        folder = tmp_path / f"n{nproc}"
        folder.mkdir()
        args = [str(HERE / "wds_worker.py"), str(shards), str(folder)]
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        )
        result = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        out[nproc] = [torch.load(folder / f"rank{r}.pt") for r in range(nproc)]
    (single,), (r0, r1) = out[1], out[2]
    assert single["val_samples"] == r0["val_samples"] == r1["val_samples"] == 18
    for epoch in range(2):
        a, b = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(a) == len(b) == 2  # 18 samples, 2 ranks x batch 4: 2 steps each, 2 samples sit out
        seen = [i for batch in a + b for i in batch]
        assert len(seen) == len(set(seen)) == 16
        stream = shard_stream([4, 4, 4, 4, 2], 0, epoch).tolist()
        assert sorted(seen) == sorted(stream[:16])  # the epoch, less the end of its stream
    assert r0["epochs"][0] != r0["epochs"][1]


# ---------------------------------------------------------------- other sources


def test_shards_from_a_hugging_face_dataset_keep_its_bytes(tmp_path, capsys):
    pytest.importorskip("datasets")
    from helpers import make_dataset

    make_dataset(per_class=3).save_to_disk(str(tmp_path / "hf"))
    assert (
        main(
            [
                "shards",
                "--config",
                "demo",
                "--set",
                "data.dataset=hf",
                "--set",
                f"data.root={tmp_path / 'hf'}",
                "--set",
                "runtime.progress=false",
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 0
    )
    from pfb_train.data.wds import ShardSplit, ShardedTars, read_info

    info = read_info(tmp_path / "shards")
    entry = info["splits"]["validation"]
    assert info["num_classes"] == 2 and entry["num_samples"] == 8
    split = ShardSplit(
        "validation", tuple(str(tmp_path / "shards" / f) for f in entry["filenames"]), tuple(entry["shard_lengths"])
    )
    source = make_dataset(per_class=3)["validation"].cast_column("image", __import__("datasets").Image(decode=False))
    for i in range(8):  # validation keeps the source's order
        assert ShardedTars(split, 2).encoded(i) == (source[i]["image"]["bytes"], source[i]["label"])


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10", "digits"])
def test_shards_from_pixels_are_lossless_png(dataset, tmp_path):
    from helpers import write_cifar, write_fashion_mnist

    from pfb_train.data.cifar import cifar_arrays
    from pfb_train.data.fashion import idx_file, read_idx
    from pfb_train.data.wds import ShardSplit, ShardedTars, read_info

    if dataset == "fashion_mnist":
        root = write_fashion_mnist(tmp_path / "fm", train_per_class=2, val_per_class=1)
        images = read_idx(idx_file(root, "t10k-images-idx3-ubyte")).unsqueeze(1)
        labels = read_idx(idx_file(root, "t10k-labels-idx1-ubyte"))
    elif dataset == "digits":
        from pfb_train.data.generated import load_digits

        root, (images, labels, _, val) = None, load_digits()
        images, labels = (images[val] * 255).round().to(torch.uint8), labels[val]
    else:
        root = tmp_path / "cifar"
        write_cifar(root)
        images, labels = cifar_arrays("cifar10", str(root))["val"]
    assert (
        main(
            [
                "shards",
                "--config",
                "demo",
                "--set",
                f"data.dataset={dataset}",
                "--set",
                "runtime.progress=false",
                *(["--set", f"data.root={root}"] if root else []),
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 0
    )
    entry = read_info(tmp_path / "shards")["splits"]["validation"]
    split = ShardSplit(
        "validation", tuple(str(tmp_path / "shards" / f) for f in entry["filenames"]), tuple(entry["shard_lengths"])
    )
    assert entry["num_samples"] == len(labels)
    for i in range(len(labels)):  # validation keeps the source's order
        data, label = ShardedTars(split, 10).encoded(i)
        assert data[:4] == b"\x89PNG" and label == int(labels[i])
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(pixels.reshape(*pixels.shape[:2], -1), images[i].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("layout", ["webdataset_pax", "ustar", "gnu_long_names", "pax_long_names"])
def test_shard_headers_read_like_tarfile_reads_them(layout, tmp_path):
    import tarfile

    import webdataset

    from pfb_train.data.wds import _tarfile_members, scan_shard

    path = tmp_path / "shard.tar"
    names = [f"{'long' * 30 if 'long' in layout else ''}{i:04d}.{ext}" for i in range(5) for ext in ("jpg", "cls")]
    if layout == "webdataset_pax":  # its default float modification time adds a PAX header to every member
        with webdataset.TarWriter(str(path), encoder=False) as writer:
            for i in range(5):
                writer.write({"__key__": f"{i:04d}", "jpg": bytes([i]) * (700 + i), "cls": str(i).encode()})
    else:
        fmt = {
            "ustar": tarfile.USTAR_FORMAT,
            "gnu_long_names": tarfile.GNU_FORMAT,
            "pax_long_names": tarfile.PAX_FORMAT,
        }[layout]
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in names:
                data = name.encode() * 9
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = scan_shard(str(path))
    assert len(samples) == 5 and all(s.image and s.label for s in samples)
    members = {name: (offset, size) for name, offset, size in _tarfile_members(str(path))}
    for sample in samples:
        assert members[f"{sample.key}.jpg"] == sample.image and members[f"{sample.key}.cls"] == sample.label
