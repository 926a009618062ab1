import json

import numpy as np
import pytest
import torch
from PIL import Image

from pfb_train.config import DataConfig
from pfb_train.data import (
    FASHION_MNIST_FILES,
    build_datasets,
    build_loaders,
    dataset_labels,
    digits,
    long_tailed_counts,
    read_idx,
)
from pfb_train.data.loaders import ShardStreamSampler, TrainSampler
from pfb_train.data.wds import shard_stream
from pfb_train.errors import UserError
from helpers import run_main, write_cifar, write_fashion_mnist, write_idx


def make_image_folder(root, classes=("cat", "dog"), per_class=(6, 3), size=(40, 30)):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                ext = "JPEG" if i % 2 == 0 else "png"  # real JPEG and PNG files
                Image.fromarray(pixels).save(folder / f"{name}_{i}.{ext}")
    return root


def test_imagefolder_loads_real_files_with_indices(tmp_path):
    root = make_image_folder(tmp_path / "data")
    cfg = DataConfig(dataset="imagefolder", root=str(root), img_size=32, batch_size=4, workers=0)
    splits = build_datasets(cfg)
    assert splits.num_classes == 2 and len(splits.train) == 12 and len(splits.val) == 6
    train, val = build_loaders(splits, cfg, seed=0)
    x, y, indices = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert indices.dtype == torch.int64 and len(set(indices.tolist())) == 4
    for i, label in zip(indices.tolist(), y.tolist()):
        assert splits.train.targets[i] == label  # the index names the sample
    assert sum(len(b[2]) for b in val) == 6  # validation visits every sample once


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing_root", "data.root does not exist"),
        ("no_val", "dataset folder not found"),
        ("empty_class", "holds no images"),
        ("class_mismatch", "different class folders"),
    ],
)
def test_imagefolder_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing_root":
        make_image_folder(root)
    if layout == "no_val":
        import shutil

        shutil.rmtree(root / "val")
    elif layout == "empty_class":
        (root / "train" / "zebra").mkdir()
    elif layout == "class_mismatch":
        import shutil

        shutil.rmtree(root / "val" / "dog")
    cfg = DataConfig(dataset="imagefolder", root=str(root), img_size=32, batch_size=2, workers=0)
    with pytest.raises(UserError, match=message):
        build_datasets(cfg)


def test_digits_split_is_fixed_and_disjoint():
    a, b = digits(16), digits(16)
    assert len(a.train) + len(a.val) == 1797 and a.num_classes == 10
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    train_rows = {tuple(t.flatten().tolist()[:64]) for t in a.train.tensors[0][:200]}
    assert not any(tuple(t.flatten().tolist()[:64]) in train_rows for t in a.val.tensors[0][:50])


def test_synthetic_is_seeded_and_class_dependent():
    cfg = DataConfig(dataset="synthetic", img_size=16, train_samples=200, val_samples=50)
    a, b = build_datasets(cfg, 4, seed=1), build_datasets(cfg, 4, seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    x, y = a.train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert (means[0] - means[1]).abs().mean() > 0.2  # classes differ beyond the noise


def test_too_few_samples_for_batch(tmp_path):
    cfg = DataConfig(dataset="synthetic", img_size=16, train_samples=10, val_samples=5, batch_size=16)
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_loaders(build_datasets(cfg, 2), cfg, seed=0)


def test_num_classes_mismatch():
    cfg = DataConfig(dataset="digits", img_size=16)
    with pytest.raises(
        UserError, match="'model.num_classes' is 5 but dataset 'digits' has 10 classes: set model.num_classes=null"
    ):
        build_datasets(cfg, 5)


@pytest.mark.parametrize("name,classes,train_total", [("cifar10", 10, 100), ("cifar100", 100, 20)])
def test_cifar_reads_torchvision_files(tmp_path, name, classes, train_total):
    write_cifar(tmp_path, name)
    cfg = DataConfig(dataset=name, root=str(tmp_path), img_size=32, batch_size=4, workers=0)
    splits = build_datasets(cfg)
    assert splits.num_classes == classes and len(splits.train) == train_total and len(splits.val) == 10
    x, y, indices = next(iter(build_loaders(splits, cfg, seed=0)[0]))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.max() < classes


def test_cifar_missing_files_is_one_line_without_download(tmp_path):
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), img_size=32)
    with pytest.raises(UserError, match="cifar10 files not found: .*data_batch_1 .*data.download=true"):
        build_datasets(cfg)


def test_worker_augmentation_depends_on_epoch_and_sample_only(tmp_path):
    """Random crops/flips made in workers repeat for any worker count and after a mid-epoch restart."""
    from helpers import write_smooth_folder

    from pfb_train.data import set_loader_epoch

    write_smooth_folder(tmp_path, per_class=8)

    def epoch_images(workers, epoch=1, skip=0):
        cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=24, batch_size=4, workers=workers)
        train, _ = build_loaders(build_datasets(cfg), cfg, seed=5)
        set_loader_epoch(train, epoch, None, skip)
        return {i: x for xs, _, indices in train for x, i in zip(xs, indices.tolist())}

    one = epoch_images(workers=1)
    two = epoch_images(workers=2)
    assert len(one) == 16 and one.keys() == two.keys()
    assert all(torch.equal(one[i], two[i]) for i in one)
    resumed = epoch_images(workers=2, skip=8)  # a restart after two batches: fresh workers
    assert len(resumed) == 8 and all(torch.equal(one[i], resumed[i]) for i in resumed)
    other_epoch = epoch_images(workers=1, epoch=2)
    assert sum(torch.equal(one[i], other_epoch[i]) for i in one) < 4  # new crops each epoch


# -- Fashion-MNIST from idx files, fixed subsets -----------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files_plain_or_gzipped(tmp_path, compress):
    root = write_fashion_mnist(tmp_path / "fm", compress=compress)
    splits = build_datasets(DataConfig(dataset="fashion_mnist", root=str(root), img_size=28))
    assert (len(splits.train), len(splits.val), splits.num_classes) == (120, 50, 10)
    raw = read_idx(next(root.glob("train-images*")))
    assert raw.shape == (120, 28, 28) and raw.dtype == torch.uint8
    x, y = splits.val[3]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and torch.equal(x[0], x[2])
    expected = (read_idx(next(root.glob("t10k-images*")))[3].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expected, atol=1e-5)  # val images: only scaled and normalised
    assert y == int(read_idx(next(root.glob("t10k-labels*")))[3])


def test_fashion_mnist_refuses_labels_outside_its_ten_classes(tmp_path):
    """Another MNIST-family set in data.root (EMNIST's letters are labelled 1..26) would train on labels past
    the model's classes: a one-line error naming the file instead."""
    root = write_fashion_mnist(tmp_path / "fm", compress=False)
    write_idx(root / FASHION_MNIST_FILES["train"][1], np.arange(120) % 27, compress=False)
    with pytest.raises(
        UserError,
        match=r"labels file .*train-labels-idx1-ubyte holds class 26, outside 0..9: "
        r"fashion_mnist has 10 classes",
    ):
        build_datasets(DataConfig(dataset="fashion_mnist", root=str(root), img_size=28))


def test_fixed_stratified_subset_and_long_tail(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", train_per_class=20)
    cfg = DataConfig(dataset="fashion_mnist", root=str(root), img_size=28, train_samples=100, val_samples=30)
    splits = build_datasets(cfg)
    assert torch.bincount(dataset_labels(splits.train)).tolist() == [10] * 10
    assert torch.bincount(dataset_labels(splits.val)).tolist() == [3] * 10
    again = build_datasets(cfg)
    assert torch.equal(splits.train.images, again.train.images)  # fixed: the same subset every time
    tail = build_datasets(
        DataConfig(dataset="fashion_mnist", root=str(root), img_size=28, train_samples=100, imbalance=0.1)
    )
    counts = torch.bincount(dataset_labels(tail.train)).tolist()
    assert counts == long_tailed_counts([10] * 10, 0.1) and counts[0] == 10 and counts[-1] == 1
    assert counts == sorted(counts, reverse=True)
    assert len(tail.val) == 50  # validation stays balanced and whole
    step = build_datasets(
        DataConfig(
            dataset="fashion_mnist", root=str(root), img_size=28, train_samples=100, imbalance=0.2, rare_classes=[0, 7]
        )
    )
    assert torch.bincount(dataset_labels(step.train)).tolist() == [2, 10, 10, 10, 10, 10, 10, 2, 10, 10]


def test_digits_subset_keeps_class_proportions():
    splits = build_datasets(DataConfig(dataset="digits", img_size=8, train_samples=500))
    counts = torch.bincount(dataset_labels(splits.train), minlength=10)
    full = torch.bincount(dataset_labels(digits(8).train), minlength=10)
    assert counts.sum() == 500
    assert ((counts - full * 500 / full.sum()).abs() <= 1).all()


def test_fashion_mnist_trains_from_the_cli(capsys, tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", train_per_class=8)
    result = run_main(
        capsys,
        "--config",
        "fashion_mnist",
        "--set",
        f"data.root={root}",
        "--set",
        "data.train_samples=64",
        "--set",
        "data.val_samples=20",
        "--set",
        "data.batch_size=16",
        "--set",
        "blocking.pfb.centres=8",
        "--set",
        "schedule.epochs=2",
        "--set",
        "blocking.method=pfb",
        "--set",
        "blocking.pfb.start_epoch=0",
        "--set",
        "blocking.random.start_epoch=0",
        "--set",
        f"runtime.output={tmp_path}/runs",
        "--set",
        "name=fm",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "fm" / "summary.json").read_text())
    counts = summary["train_class_counts"]
    assert summary["dataset"] == "fashion_mnist" and sum(counts) == 64 and max(counts) - min(counts) == 1
    records = [json.loads(line) for line in (tmp_path / "runs" / "fm" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["selection_signal"] <= 1.0 for r in records)
    assert len(records[-1]["val_class_top1"]) == 10


def order(sampler, epoch):
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: TrainSampler(64, seed=seed),
        lambda seed: ShardStreamSampler([8] * 8, batch_size=4, window=4, seed=seed),
    ],
)
def test_seeds_give_unrelated_orders_not_shifted_epochs(make):
    """seed + epoch made seed 1's epoch 0 seed 0's epoch 1: a 3-seed study replayed one order sequence."""
    orders = {(seed, epoch): order(make(seed), epoch) for seed in range(3) for epoch in range(3)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)  # nine different orders
    assert order(make(1), 2) == orders[(1, 2)]  # and each one reproducible


def test_shard_orders_differ_between_seeds_and_epochs():
    streams = {(s, e): tuple(shard_stream([4] * 12, s, e)) for s in range(3) for e in range(3)}
    assert len(set(streams.values())) == len(streams)


@pytest.mark.parametrize("cpus,local_world,workers", [(2, None, 1), (1, None, 0), (16, "4", 3), (64, None, 8)])
def test_loader_workers_default_to_this_process_share_of_the_cpus(monkeypatch, cpus, local_world, workers):
    from pfb_train.data.loaders import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert loader_workers(None) == workers and loader_workers(5) == 5  # one set is taken as it is
