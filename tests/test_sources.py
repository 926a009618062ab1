"""Data sources as registered units (pfb_train/data/registry.py): the listing, a source defined here that
trains through the CLI, the config checks that ask the source, and CIFAR through torchvision's readers."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pfb_train import plugins
from pfb_train.cli import main
from pfb_train.config import DataConfig, load_config
from pfb_train.data import DataSource, DataSplits, build_datasets, register, sources, unregister
from pfb_train.errors import UserError


def toy_splits(d, num_classes, seed) -> DataSplits:
    """Two classes of random float32 (3, img_size, img_size) images, class 1 brighter."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        labels = torch.arange(n) % 2
        images = torch.randn(n, 3, d.img_size, d.img_size, generator=gen) + labels.view(-1, 1, 1, 1)
        return TensorDataset(images, labels)

    return DataSplits(draw(32), draw(8), 2)


TOY = DataSource(
    "toy",
    build=toy_splits,
    summary="a test's own two classes of noise",
    samples="stored",
    imbalance=False,
    num_classes=lambda d: 2,
)


@pytest.fixture
def toy_source():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def test_datasets_command_lists_every_source_with_its_summary_and_options(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for source in sources().values():
        assert f"{source.name}: {source.summary}" in out
    assert list(sources())[:8] == [
        "synthetic",
        "digits",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagefolder",
        "hf",
        "wds",
    ]
    assert "data.root (required), data.download" in out and "data.decode: cpu | device | dali" in out


def test_a_source_defined_outside_the_package_trains_through_the_cli(toy_source, tmp_path, capsys):
    args = [
        "--config",
        "demo",
        "--set",
        "data.dataset=toy",
        "--set",
        "model.name=test_resnet",
        "--set",
        "model.num_classes=null",
        "--set",
        "data.img_size=16",
        "--set",
        "data.batch_size=8",
        "--set",
        "schedule.epochs=1",
        "--set",
        "schedule.warmup_epochs=0",
        "--set",
        "blocking.method=none",
        "--set",
        f"runtime.output={tmp_path}",
        "--set",
        "runtime.progress=false",
        "--set",
        "name=toy",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["dataset"] == "toy" and sum(summary["train_class_counts"]) == 32
    # The config's checks ask the source: subsets do not apply to it, nor device decoding.
    assert main([*args, "--set", "data.train_samples=8"]) == 2
    assert "'data.train_samples' does not apply to dataset 'toy'" in capsys.readouterr().err
    assert main([*args, "--set", "data.decode=device"]) == 2
    assert "'data.decode' 'device' applies to datasets imagefolder, hf, wds, not 'toy'" in capsys.readouterr().err


def test_an_unknown_dataset_is_one_line_naming_the_registered_ones():
    with pytest.raises(
        UserError,
        match=r"unknown dataset 'cifar' \(did you mean 'cifar10'\? choose one of: "
        r"synthetic, digits, .*wds; `pfb-train datasets`",
    ):
        load_config(None, ["data.dataset=cifar"])
    with pytest.raises(UserError, match="'data.root' is required for dataset 'cifar100'"):
        load_config(None, ["data.dataset=cifar100"])  # the source says it needs a root


def test_cifar_reads_torchvision_files_pixel_for_pixel(tmp_path):
    from helpers import write_cifar

    from pfb_train.data.cifar import cifar_arrays

    write_cifar(tmp_path, "cifar100", n_train=6, n_test=4)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        raw = __import__("pickle").load(f)
    images, labels = cifar_arrays("cifar100", str(tmp_path))["val"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert np.array_equal(images.numpy(), raw["data"].reshape(4, 3, 32, 32))  # the rows are planes R, G, B
    assert labels.tolist() == [int(v) for v in raw["fine_labels"]]
    splits = build_datasets(DataConfig(dataset="cifar100", root=str(tmp_path), img_size=32))
    assert torch.equal(splits.val.images, images) and splits.num_classes == 100


def test_a_plugin_source_registers_through_the_entry_point_group(monkeypatch, tmp_path):
    import dataclasses
    import importlib.metadata

    from pfb_train.data import registry

    (tmp_path / "toy_source_plugin.py").write_text(
        "import dataclasses\n\nfrom pfb_train.data import register\nfrom test_sources import TOY\n\n"
        "register(dataclasses.replace(TOY, name='plugged'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(name="plugged", value="toy_source_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry._REGISTRY, "loaded", False)
    try:
        assert "plugged" in sources()
        assert load_config(None, ["data.dataset=plugged"]).data.dataset == "plugged"
        assert dataclasses.replace(TOY, name="plugged") == registry.get_source("plugged")
    finally:
        unregister("plugged")
