"""The device-decode input path (data.decode: device), run on the CPU here; CUDA in test_gpu.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smooth_image, write_smooth_folder
from pfb_train.config import DataConfig, load_config
from pfb_train.data import build_datasets, build_loaders, start_epoch
from pfb_train.errors import UserError
from pfb_train.metrics import read_metrics
from pfb_train.train import run


@pytest.fixture
def folder(tmp_path):
    rng = write_smooth_folder(tmp_path, per_class=6)
    Image.fromarray(smooth_image(rng, 40, 40)).save(tmp_path / "train" / "a" / "z.png")
    return tmp_path


def loaders(root, **kw):
    cfg = DataConfig(dataset="imagefolder", root=str(root), img_size=32, batch_size=4, workers=0, **kw)
    splits = build_datasets(cfg)
    return splits, cfg, *build_loaders(splits, cfg, seed=0)


def test_batches_are_normalised_images_with_their_labels(folder):
    splits, _, train, _ = loaders(folder, decode="device")
    start_epoch(train, 0)
    seen = []
    for x, y, idx in train:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert -3 < x.min() and x.max() < 3
        assert y.tolist() == [splits.train.targets[i] for i in idx.tolist()]
        seen += idx.tolist()
    assert len(seen) == 12 and len(set(seen)) == 12  # 13 files, drop_last: 3 full batches, PNG included in the pool


def test_eval_path_matches_the_cpu_pipeline(folder):
    _, _, _, device_val = loaders(folder, decode="device")
    _, _, _, cpu_val = loaders(folder, decode="cpu")
    a = torch.cat([x for x, _, _ in device_val])
    b = torch.cat([x for x, _, _ in cpu_val])
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 0.05  # same resize + centre crop + normalisation; resamplers differ slightly


def test_crops_follow_the_epoch_seed_and_leave_the_global_rng_alone(folder):
    _, _, train, _ = loaders(folder, decode="device")

    def epoch_batches(epoch):
        start_epoch(train, epoch)
        return [x for x, _, _ in train]

    before = torch.get_rng_state()
    first, again, other = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_unreadable_files_are_dropped_or_fatal(folder):
    (folder / "train" / "b" / "zz.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "train" / "b" / "zzz.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "train" / "b" / "good.jpg")
    _, _, train, _ = loaders(folder, decode="device")  # 16 files: 4 full batches visit every one
    start_epoch(train, 0)
    assert sum(len(idx) for _, _, idx in train) == 16 - 2
    _, _, train, _ = loaders(folder, decode="device", bad_images="fail")
    start_epoch(train, 0)
    with pytest.raises(UserError, match=r"unreadable image .*zz+\.jpg"):
        list(train)


def test_training_run_with_device_decode(folder, tmp_path):
    summary = run(load_config(None, [
        "model.name=resnet18", "data.dataset=imagefolder", f"data.root={folder}", "data.decode=device",
        "data.img_size=32", "data.batch_size=4", "data.workers=0", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "blocking.method=pfb", "blocking.centers=4", "runtime.progress=false", "runtime.device=cpu",
        f"runtime.output={tmp_path}/runs"]))
    record = read_metrics(summary["run_dir"])[0]
    assert record["samples_seen"] == 12 and record["val_samples"] == 12 and record["samples_blocked"] > 0


def test_device_decode_config_errors():
    with pytest.raises(UserError, match="applies to dataset 'imagefolder'"):
        load_config(None, ["data.decode=device", "data.dataset=digits"])
    with pytest.raises(UserError, match="auto_augment"):
        load_config(None, ["data.decode=device", "data.dataset=imagefolder", "data.root=/x",
                           "data.auto_augment=rand-m9-mstd0.5"])
