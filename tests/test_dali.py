"""`data.decode: dali` on DALI's CPU operators: order, pixels, bad images, every method, resume, gloo, every layout.
The GPU (`mixed` decoder) is checked in test_gpu.py."""

import builtins
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pfb_train.cli import main
from pfb_train.config import DataConfig, load_config
from pfb_train.data.dali import decoder_logs_muted
from pfb_train.data import build_datasets, build_loaders, set_loader_epoch
from pfb_train.data.device_decode import resized_crop_boxes, resized_crop_uniforms
from pfb_train.data.draws import sample_uniforms
from pfb_train.distributed import DistInfo
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.selection import methods
from pfb_train.train import fit, setup
from helpers import folder_to_shards, SMALL_RUN_OPTIONS, assert_equal, smooth_image, write_smooth_folder

HERE = Path(__file__).resolve().parent
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali") / "folder"
    rng = write_smooth_folder(root, per_class=9)  # 18 JPEGs a split, sizes 40..64 x 52
    Image.fromarray(smooth_image(rng, 44, 36)).save(root / "val" / "a" / "p.png")  # a PNG in each split
    Image.fromarray(smooth_image(rng, 30, 50)).save(root / "train" / "b" / "p.png")
    return root


def loaders(root, decode, dataset="imagefolder", channels_last=False, **kw):
    cfg = DataConfig(
        **{"dataset": dataset, "root": str(root), "img_size": 32, "batch_size": 4, "workers": 0, "decode": decode, **kw}
    )
    splits = build_datasets(cfg)
    return splits, *build_loaders(splits, cfg, seed=0, channels_last=channels_last)


def epoch(loader, number):
    set_loader_epoch(loader, number)
    return list(loader)


def reference_crop(path, box, flip, size=32):
    """The train augmentation written out for one image: crop the box, resize (antialiased bilinear), flip, normalise."""
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
    top, left, h, w = box
    crop = F.interpolate(
        image[None, :, top : top + h, left : left + w],
        size=(size, size),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0]
    return ((crop.flip(-1) if flip else crop) - MEAN) / STD


def test_same_samples_in_the_same_order_with_their_labels_as_the_cpu_path(folder):
    splits, dali_train, dali_val = loaders(folder, "dali")
    _, cpu_train, cpu_val = loaders(folder, "cpu")
    for number in (0, 1):
        dali, cpu = epoch(dali_train, number), epoch(cpu_train, number)
        assert [b[2].tolist() for b in dali] == [b[2].tolist() for b in cpu]
        assert [b[1].tolist() for b in dali] == [b[1].tolist() for b in cpu]
        for x, y, indices in dali:
            assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
            assert y.tolist() == [splits.train.targets[i] for i in indices.tolist()]
    assert [b[2].tolist() for b in dali_val] == [b[2].tolist() for b in cpu_val]


def test_validation_pixels_equal_the_cpu_path_within_rounding(folder):
    _, _, dali_val = loaders(folder, "dali")
    _, _, cpu_val = loaders(folder, "cpu")
    dali = torch.cat([x for x, _, _ in dali_val]) * STD.view(1, 3, 1, 1)  # back to 0..255 levels
    cpu = torch.cat([x for x, _, _ in cpu_val]) * STD.view(1, 3, 1, 1)
    assert dali.shape == cpu.shape == (19, 3, 32, 32)
    difference = (dali - cpu).abs()
    assert difference.mean() < 0.6 and difference.max() <= 3.0  # resamplers round differently, by a level or so


def test_train_pixels_are_the_seeded_crop_of_each_sample(folder):
    """Each sample's box and flip come from its own seed (seed, epoch, index): the batch equals the
    augmentation written out by hand, whatever the batch size or number of workers."""
    splits, train, _ = loaders(folder, "dali")
    flips = 0
    for x, _, indices in epoch(train, 3):
        seeds = train.sampler.sample_seeds(indices)
        uniforms = sample_uniforms(seeds, resized_crop_uniforms() + 1)
        for row, index in enumerate(indices.tolist()):
            path = splits.train.samples[index][0]
            width, height = Image.open(path).size
            box = resized_crop_boxes(torch.tensor([height]), torch.tensor([width]), uniforms[row : row + 1, :-1])[0]
            flip = bool(uniforms[row, -1] < 0.5)
            flips += flip
            want = reference_crop(path, box.tolist(), flip)
            assert (x[row] - want).abs().mean() < 0.02, (index, box)  # under a level on average
    assert 0 < flips < 16
    _, other, _ = loaders(folder, "dali", batch_size=3, workers=2)
    by_index = {i: image for x, _, indices in epoch(train, 3) for i, image in zip(indices.tolist(), x)}
    compared = 0
    for x, _, indices in epoch(other, 3):  # drop_last leaves 3 of 19 out at batch 4, 1 at batch 3
        for i, image in zip(indices.tolist(), x):
            if i in by_index:
                assert torch.equal(image, by_index[i])
                compared += 1
    assert compared >= 15


def test_channels_last_batches(folder):
    _, train, val = loaders(folder, "dali", channels_last=True)
    _, plain, _ = loaders(folder, "dali")
    (x, _, _), (y, _, _) = epoch(train, 0)[0], epoch(plain, 0)[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (4, 3, 32, 32)
    assert torch.equal(x, y)


def test_bad_images_stand_in_or_stop_the_run(tmp_path):
    root = tmp_path / "bad"
    write_smooth_folder(root, per_class=4)
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "x_truncated.jpg").write_bytes(good[: len(good) // 2])  # header parses, data does not
    (root / "train" / "b" / "x_text.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "b" / "x_empty.jpg").write_bytes(b"")
    (root / "val" / "a" / "x_text.png").write_bytes(b"not a png")
    _, train, val = loaders(root, "dali")
    batches = epoch(train, 0)  # 11 files: 2 full batches, so two epochs show at least two of them
    batches += epoch(train, 1)
    missing = [(x, y, indices) for x, y, indices in batches if (indices < 0).any()]
    assert missing and all(len(indices) == 4 for _, _, indices in batches)
    for x, y, indices in missing:  # a stand-in repeats a readable sample of its batch (pixels and label)
        for row in (indices < 0).nonzero().flatten().tolist():
            assert any(torch.equal(x[row], x[o]) and y[row] == y[o] for o in range(4) if indices[o] >= 0)
    assert sum(int((indices < 0).sum()) for _, _, indices in list(val)) == 1
    _, strict, _ = loaders(root, "dali", bad_images="fail")
    with pytest.raises(UserError, match=r"unreadable image .*x_\w+\.jpg"):
        for number in range(4):
            epoch(strict, number)


def test_decoder_messages_stay_out_of_stderr_and_other_lines_pass(tmp_path, capfd):
    root = tmp_path / "noisy"
    write_smooth_folder(root, per_class=4)
    good = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "x_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "x_sof.jpg").write_bytes(good[:200] + good[2:])  # libjpeg: "two SOF markers"
    _, train, _ = loaders(root, "dali")
    capfd.readouterr()
    assert sum(int((indices < 0).sum()) for number in range(3) for _, _, indices in epoch(train, number)) > 0
    assert capfd.readouterr().err == ""  # native decoders said nothing; the bad files count as stand-ins
    with decoder_logs_muted():
        os.write(2, b"\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode\nInput file read error\n")
        os.write(2, b"\repoch 3:  50%|#####     | 5/10\nx.py:1: UserWarning: kept\n")
    assert capfd.readouterr().err == "\repoch 3:  50%|#####     | 5/10\nx.py:1: UserWarning: kept\n"


def test_a_batch_of_nothing_readable_is_one_line(tmp_path):
    root = tmp_path / "broken"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(4):
            (root / split / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8 nothing")
    _, train, _ = loaders(root, "dali")
    with pytest.raises(UserError, match="all 4 images of a batch are unreadable"):
        epoch(train, 0)


def test_without_dali_the_error_names_the_install(folder, monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    settings = [
        "data.dataset=imagefolder",
        f"data.root={folder}",
        "data.decode=dali",
        "model.num_classes=null",
        "data.batch_size=4",
        "blocking.method=none",
        f"runtime.output={tmp_path}",
        "runtime.progress=false",
    ]
    code = main(["--config", "demo", *(arg for item in settings for arg in ("--set", item))])
    err = capsys.readouterr().err
    assert code == 2 and "pip install nvidia-dali-cuda130" in err and "Traceback" not in err


# ---------------------------------------------------------------- training runs


def overrides(root, out, method="pfb", *extra, dataset="imagefolder"):
    return [
        "model.name=test_resnet",
        "model.num_classes=null",
        f"data.dataset={dataset}",
        f"data.root={root}",
        "data.img_size=16",
        "data.batch_size=4",
        "data.workers=0",
        "data.decode=dali",
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
def test_every_method_trains_with_dali(method, folder, tmp_path):
    records = read_metrics(fit(setup(load_config(None, overrides(folder, tmp_path, method)), DistInfo()))["run_dir"])
    assert len(records) == 2 and all(r["val_samples"] == 19 and r["bad_samples"] == 0 for r in records)
    assert all(r["samples_seen"] + r["samples_pruned"] == 16 for r in records)  # 19 files, batch 4: 4 steps


def test_resume_inside_an_epoch_is_exact_with_another_worker_count(folder, tmp_path):
    def train(name, workers, resume=False, **until):
        extra = [
            f"name={name}",
            "data.mixup=0.2",
            f"data.workers={workers}",
            *(["runtime.resume=auto"] if resume else []),
        ]
        state = setup(load_config(None, overrides(folder, tmp_path, "infobatch", *extra)), DistInfo())
        fit(state, **until)
        return state

    whole = train("whole", workers=2)
    train("cut", workers=2, until_step=6)  # inside epoch 1
    resumed = train("cut", workers=1, resume=True)
    assert_equal(whole.net.state_dict(), resumed.net.state_dict(), "model")
    assert_equal(whole.selector.state_dict(), resumed.selector.state_dict(), "selector")


def test_hf_and_wds_layouts_give_the_folders_pixels(folder, tmp_path, capsys):
    pytest.importorskip("webdataset")
    datasets = pytest.importorskip("datasets")
    shards = folder_to_shards(folder, tmp_path / "shards", 5)
    hf_root = tmp_path / "hf"
    splits = build_datasets(DataConfig(dataset="imagefolder", root=str(folder), decode="dali"))
    rows = {
        name: {
            "image": [{"bytes": split.loader(path).numpy().tobytes(), "path": None} for path, _ in split.samples],
            "label": [label for _, label in split.samples],
        }
        for name, split in (("train", splits.train), ("validation", splits.val))
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in rows.items()}).save_to_disk(
        hf_root
    )
    _, _, folder_val = loaders(folder, "dali")
    want = torch.cat([x for x, _, _ in folder_val])
    for dataset, root in (("hf", hf_root), ("wds", shards)):
        _, train, val = loaders(root, "dali", dataset=dataset)
        got = {}
        for x, _, indices in val:
            got.update(zip(indices.tolist(), x))
        if dataset == "hf":  # same order as the folder
            assert torch.equal(torch.stack([got[i] for i in range(len(got))]), want)
        else:  # shards keep each sample's source index as its key
            assert sorted(x.sum().item() for x in got.values()) == pytest.approx(sorted(want.sum((1, 2, 3)).tolist()))
        assert len(epoch(train, 0)) == 4


def test_a_gif_stands_in_on_dali_and_trains_on_cpu(tmp_path):
    """DALI decodes no GIF: such an image is a stand-in (counted), where PIL (`cpu`) decodes it."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def encoded(fmt):
        buffer = io.BytesIO()
        Image.fromarray(smooth_image(rng, 24, 24)).save(buffer, fmt)
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [encoded("GIF")] + [encoded("JPEG") for _ in range(7)]
    split = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "hf")
    for decode, stand_ins in (("dali", 1), ("cpu", 0)):
        _, _, val = loaders(tmp_path / "hf", decode, dataset="hf")
        assert sum(int((indices < 0).sum()) for _, _, indices in val) == stand_ins


@pytest.mark.distributed
def test_two_gloo_processes_see_the_pixels_of_one(folder, tmp_path, capsys):
    """2 gloo ranks on shards (tests/wds_worker.py): equal disjoint shares, and each sample's pixels as
    one process makes them (here, in this process: the worker's data settings)."""
    shards = folder_to_shards(folder, tmp_path / "shards", 4)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*launcher, str(HERE / "wds_worker.py"), str(shards), str(tmp_path), "data.decode=dali"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["val_samples"] == r1["val_samples"] == 19
    for number in range(2):
        seen = [i for batch in r0["epochs"][number] + r1["epochs"][number] for i in batch]
        assert len(seen) == len(set(seen)) == 16  # 19 samples, 2 ranks x batch 4: 2 steps each
    _, single, _ = loaders(shards, "dali", dataset="wds", img_size=16)
    alone = {
        (number, i): x.double().sum().item()
        for number in range(2)
        for images, _, indices in epoch(single, number)
        for i, x in zip(indices.tolist(), images)
    }
    both = {**r0["pixel_sums"], **r1["pixel_sums"]}
    assert len(both.keys() & alone.keys()) >= 16  # a sample's pixels do not depend on which rank made them
    assert all(both[k] == pytest.approx(alone[k], rel=1e-6) for k in both.keys() & alone.keys())
