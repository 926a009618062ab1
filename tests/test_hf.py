"""`data.dataset: hf`: Hugging Face datasets built in the test (no network), every method, exact resume."""

from pathlib import Path
import sys

import pytest
import torch

from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.selection import methods
from pfb_train.train import fit, setup
from helpers import SMALL_RUN_OPTIONS, assert_equal, make_dataset

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "saved"
    make_dataset().save_to_disk(str(root))
    return root


def overrides(root, out, method="pfb", *extra):
    return [
        "model.name=test_resnet",
        "data.dataset=hf",
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


@pytest.mark.parametrize("method", list(methods()))
def test_every_method_trains_on_a_saved_dataset(method, saved, tmp_path):
    state = setup(load_config(None, overrides(saved, tmp_path, method)), DistInfo())
    summary = fit(state)
    records = read_metrics(summary["run_dir"])
    assert len(records) == 2 and records[-1]["val_samples"] == 8
    assert state.net.num_classes == 2  # from the ClassLabel
    assert all(r["samples_seen"] + r["samples_pruned"] == 16 for r in records)
    assert summary["train_class_counts"] == [8, 8]


def test_parquet_files_in_the_hub_layout_with_device_decode(tmp_path):
    data = make_dataset()
    for split in ("train", "validation"):
        data[split].to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    state = setup(
        load_config(None, overrides(tmp_path / "repo", tmp_path / "runs", "pfb", "data.decode=device")), DistInfo()
    )
    summary = fit(state)
    assert read_metrics(summary["run_dir"])[-1]["samples_seen"] == 16


def test_resume_inside_an_epoch_is_exact(saved, tmp_path):
    def train(name, resume=False, **until):
        extra = [f"name={name}", "data.mixup=0.2", *(["runtime.resume=auto"] if resume else [])]
        state = setup(load_config(None, overrides(saved, tmp_path, "pfb", *extra)), DistInfo())
        fit(state, **until)
        return state

    whole = train("whole")
    train("cut", until_step=5)  # inside epoch 1 (4 steps per epoch)
    resumed = train("cut", resume=True)
    assert_equal(whole.net.state_dict(), resumed.net.state_dict(), "model")
    assert_equal(whole.selector.state_dict(), resumed.selector.state_dict(), "selector")


@pytest.mark.parametrize("decode", ["cpu", "device", "dali"])
def test_an_image_that_does_not_decode_stands_in(decode, tmp_path):
    make_dataset(bad=1).save_to_disk(str(tmp_path / "data"))
    state = setup(
        load_config(None, overrides(tmp_path / "data", tmp_path, "none", f"data.decode={decode}")), DistInfo()
    )
    run_dir = fit(state)["run_dir"]
    record = read_metrics(run_dir)[0]
    assert record["bad_samples"] == 1 and record["samples_seen"] == 15 and record["kept_fraction"] == 1.0
    named = (Path(run_dir) / "unreadable.txt").read_text().splitlines()  # the sample, on every path
    assert named == [f"0\t{tmp_path / 'data'}:train[0]", f"1\t{tmp_path / 'data'}:train[0]"]


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    make_dataset(extra_image_column=True).save_to_disk(str(tmp_path / "two_images"))
    cases = [
        (tmp_path / "two_images", [], "more than one Image column; set data.image_key (columns: image (Image), label"),
        (tmp_path / "two_images", ["data.image_key=label"], "column 'label' is not an Image column"),
        (tmp_path / "two_images", ["data.image_key=mask", "data.val_split=test"], "split 'test' not found in"),
        (tmp_path / "empty", [], "no train-*.parquet files under"),
        (
            tmp_path / "unlabelled",
            [],
            "label column 'label' of " + f"{tmp_path / 'unlabelled'}:validation holds -1: "
            "classes are numbered from 0 (the Hub marks unlabelled samples",
        ),
        ("someone/not-downloaded", [], "is neither a folder nor a dataset in the local Hugging Face cache"),
    ]
    (tmp_path / "empty").mkdir()
    unlabelled = make_dataset()  # a test split as the Hub keeps them: a ClassLabel column holding -1
    unlabelled["validation"] = unlabelled["validation"].map(lambda row: {"label": -1})
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    for root, extra, message in cases:
        with pytest.raises(UserError) as err:
            setup(load_config(None, overrides(root, tmp_path / "runs", "none", *extra)), DistInfo())
        assert message in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"needs the datasets package: pip install 'pfb-train\[data\]'"):
        setup(load_config(None, overrides(tmp_path / "two_images", tmp_path / "runs", "none")), DistInfo())
    with pytest.raises(UserError, match="'data.train_samples' does not apply to dataset 'hf'"):
        load_config(None, overrides(tmp_path, tmp_path, "none", "data.train_samples=4"))


def test_labels_come_from_one_column_read(saved):
    from pfb_train.data.hf import HFImages

    table = datasets.load_from_disk(str(saved))["train"]
    images = HFImages(table, "image", "label", "saved:train")
    assert torch.equal(images.labels(), torch.tensor([i % 2 for i in range(16)]))
    assert images.names[3] == "saved:train[3]" and len(images) == 16
