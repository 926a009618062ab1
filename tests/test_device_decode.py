"""The device-decode input path (data.decode: device), run on the CPU here; CUDA in test_gpu.py."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import smooth_image, write_smooth_folder
from pfb_train.config import DataConfig, load_config
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.data.device_decode import random_resized_boxes
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
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
    set_loader_epoch(train, 0)
    seen = []
    for x, y, indices in train:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert -3 < x.min() and x.max() < 3
        assert y.tolist() == [splits.train.targets[i] for i in indices.tolist()]
        seen += indices.tolist()
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
        set_loader_epoch(train, epoch)
        return [x for x, _, _ in train]

    before = torch.get_rng_state()
    first, again, other = epoch_batches(1), epoch_batches(1), epoch_batches(2)
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_unreadable_files_are_stood_in_for_or_fatal(folder):
    (folder / "train" / "b" / "zz.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "train" / "b" / "zzz.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "train" / "b" / "good.jpg")
    _, _, train, _ = loaders(folder, decode="device")  # 16 files: 4 full batches visit every one
    set_loader_epoch(train, 0)
    batches = list(train)
    assert [len(indices) for _, _, indices in batches] == [4] * 4  # batches keep their size
    assert sum(int((indices < 0).sum()) for _, _, indices in batches) == 2  # two stand-ins (negative indices)
    (folder / "val" / "a" / os.listdir(folder / "val" / "a")[0]).write_bytes(b"")  # val: no random crops
    _, _, _, val = loaders(folder, decode="device")
    for x, y, indices in val:  # a stand-in repeats a readable image of its own batch, with that image's label
        for row in (indices < 0).nonzero().flatten().tolist():
            assert any(torch.equal(x[row], x[o]) and y[row] == y[o] for o in range(len(indices)) if indices[o] >= 0)
    _, _, train, _ = loaders(folder, decode="device", bad_images="fail")
    set_loader_epoch(train, 0)
    with pytest.raises(UserError, match=r"unreadable image .*zz+\.jpg"):
        list(train)


def test_training_run_with_device_decode(folder, tmp_path):
    summary = run(
        load_config(
            None,
            [
                "model.name=resnet18",
                "data.dataset=imagefolder",
                f"data.root={folder}",
                "data.decode=device",
                "data.img_size=32",
                "data.batch_size=4",
                "data.workers=0",
                "schedule.epochs=1",
                "schedule.warmup_epochs=0",
                "blocking.method=pfb",
                "blocking.pfb.centres=4",
                "runtime.progress=false",
                "runtime.device=cpu",
                f"runtime.output={tmp_path}/runs",
            ],
        )
    )
    record = read_metrics(summary["run_dir"])[0]
    assert record["samples_seen"] == 12 and record["val_samples"] == 12 and record["samples_blocked"] > 0


def test_device_decode_config_errors():
    with pytest.raises(UserError, match="applies to datasets imagefolder, hf, wds, not 'digits'"):
        load_config(None, ["data.decode=device", "data.dataset=digits"])
    with pytest.raises(UserError, match="auto_augment"):
        load_config(
            None,
            ["data.decode=device", "data.dataset=imagefolder", "data.root=/x", "data.auto_augment=rand-m9-mstd0.5"],
        )


def box_stats(boxes, height, width):
    top, left, h, w = boxes.double().unbind(1)
    return torch.stack(
        [(h * w / (height * width)).mean(), (w / h).log().mean(), (top / height).mean(), (left / width).mean()]
    )


@pytest.mark.parametrize("height, width", [(375, 500), (500, 100), (64, 64)])
def test_batched_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    """Same distribution as torchvision's per-image get_params: area share, log aspect, position."""
    from torchvision.transforms import v2

    n = 4000
    boxes = random_resized_boxes(torch.full((n,), height), torch.full((n,), width), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    reference = torch.tensor([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    assert torch.allclose(box_stats(boxes, height, width), box_stats(reference, height, width), atol=0.02)


def test_batched_crop_boxes_fall_back_to_a_clamped_centre_crop():
    """No draw fits a 10x200 or 300x12 image: both rules then give the same centre crop."""
    from torchvision.transforms import v2

    sizes = [(10, 200), (300, 12)]
    boxes = random_resized_boxes(
        torch.tensor([s[0] for s in sizes]), torch.tensor([s[1] for s in sizes]), torch.Generator().manual_seed(0)
    )
    expected = [v2.RandomResizedCrop.get_params(torch.empty(3, *s), [0.08, 1.0], [3 / 4, 4 / 3]) for s in sizes]
    assert boxes.tolist() == [list(e) for e in expected] == [[0, 93, 10, 13], [142, 0, 16, 12]]


def test_train_batch_is_the_resized_crop_of_each_decoded_image(folder):
    """The batched augmentation equals torchvision's resized_crop (+ flip) of the same boxes."""
    from torchvision.transforms.v2 import functional as TF

    _, _, train, _ = loaders(folder, decode="device")
    images = [torch.randint(0, 256, (3, 40 + i, 50), dtype=torch.uint8) for i in range(6)]
    train.crop_generator.manual_seed(3)
    batch = train.augment(images)
    train.crop_generator.manual_seed(3)
    heights, widths = torch.tensor([40 + i for i in range(6)]), torch.full((6,), 50)
    boxes = random_resized_boxes(heights, widths, train.crop_generator).tolist()
    flips = torch.rand(6, generator=train.crop_generator) < 0.5
    for image, box, flip, got in zip(images, boxes, flips, batch):
        want = TF.resized_crop(image, *box, [32, 32], antialias=True).float()
        want = (want.flip(-1) if flip else want) / 255
        assert torch.allclose(got * train.std[0] / 255 + train.mean[0] / 255, want, atol=1e-5)
    assert 0 < flips.sum() < 6
