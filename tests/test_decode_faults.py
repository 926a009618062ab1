"""Images that do not decode stand in on every layout and decode path; odd pixel modes decode alike on
every path (data/decode.py); layouts people have (nested class folders, plain Parquet, dotted
WebDataset keys) are read or refused in one line. Tiny real files written into tmp_path."""

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pfb_train.config import DataConfig, load_config
from pfb_train.data import build_datasets, build_loaders
from pfb_train.data.missing import Unreadable
from pfb_train.data.splits import sample_names
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.train import run
from helpers import IMAGE_FOLDER_RUN, cli, one_line, train_args, wds_args, write_folder, write_image_folder

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 22 KB PNG of 14,000 x 13,000 pixels (1-bit, constant): 546 MB once decoded to RGB."""
    return encode(Image.new("1", (14_000, 13_000)), "PNG", compress_level=9)


def grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((24, 24), value, np.uint16))


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (24, 24), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    return image


def undecodable(kind: str, bomb: bytes):
    """(stored bytes or None, extension) of one image that cannot be decoded."""
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)), "PNG")
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)), "JPEG")
    return {
        "empty": (b"", "png"),
        "null": (None, "png"),
        "no_image_member": (None, "png"),
        "truncated_png": (png[: len(png) // 2], "png"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 3], "jpg"),
        "not_an_image": (b"notes saved with the wrong suffix\n", "jpg"),
        "bomb": (bomb, "png"),
    }[kind]


# Odd pixel modes: (stored bytes, extension, the RGB every decode path gives, tolerance)
ODD_MODES = {
    "png_16_bit": lambda: (encode(grey16(0xC000), "PNG"), "png", (0xC0,) * 3, 0),  # top 8 bits, not white
    "pgm_16_bit": lambda: (encode(grey16(0x4000), "PPM"), "pgm", (0x40,) * 3, 0),  # PIL mode I
    "tiff_float": lambda: (encode(Image.fromarray(np.full((24, 24), 0.75, np.float32)), "TIFF"), "tif", (191,) * 3, 0),
    "la_png": lambda: (encode(Image.new("LA", (24, 24), (100, 30)), "PNG"), "png", (100,) * 3, 0),
    "palette_transparency": lambda: (
        encode(palette_with_transparency(), "PNG", transparency=bytes([0, 128])),
        "png",
        (200, 100, 50),
        0,
    ),
    "cmyk_jpeg": lambda: (encode(Image.new("CMYK", (24, 24), (10, 200, 30, 0)), "JPEG"), "jpg", (245, 55, 225), 3),
    "one_bit": lambda: (encode(Image.new("1", (24, 24), 1), "PNG"), "png", (255,) * 3, 0),
    "rgba_png": lambda: (encode(Image.new("RGBA", (24, 24), (10, 20, 30, 0)), "PNG"), "png", (10, 20, 30), 0),
}
WDS_EXTENSIONS = ("png", "jpg")  # what a shard's sample may hold as its image here


def write_layout(layout: str, root, first, extension: str):
    """Both splits hold two samples: sample 0 (class 0) stored as `first` (bytes, or None: a null
    cell or no image member), sample 1 (class 1) a grey PNG. Returns the build_datasets config."""
    other = encode(Image.new("RGB", (24, 24), (90, 90, 90)), "PNG")
    samples = [(first, extension, 0), (other, "png", 1)]
    if layout == "imagefolder":
        for split in ("train", "val"):
            for i, (data, ext, label) in enumerate(samples):
                (root / split / f"c{label}").mkdir(parents=True)
                (root / split / f"c{label}" / f"{i}.{ext}").write_bytes(data)
    elif layout == "hf":
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["c0", "c1"])})
        rows = {
            "image": [None if data is None else {"bytes": data, "path": None} for data, _, _ in samples],
            "label": [label for _, _, label in samples],
        }
        split = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(root))
    else:
        root.mkdir()
        for split in ("train", "validation"):
            with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
                for i, (data, ext, label) in enumerate(samples):
                    members = [(f"{i:04d}.cls", str(label).encode())]
                    if data is not None:
                        members.insert(0, (f"{i:04d}.{ext}", data))
                    add_members(tar, members)
    return dict(dataset=layout, root=str(root), img_size=16, batch_size=2, workers=0)


def add_members(tar, members) -> None:
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def undecodable_cases():
    for layout in ("imagefolder", "hf", "wds"):
        for kind in ("empty", "truncated_png", "truncated_jpeg", "not_an_image", "bomb"):
            yield layout, kind
    yield "hf", "null"
    yield "wds", "no_image_member"


# ---------------------------------------------------------------- every undecodable image stands in


@pytest.mark.parametrize("layout,kind", list(undecodable_cases()))
def test_an_image_that_does_not_decode_stands_in_on_every_layout(layout, kind, bomb, tmp_path):
    cfg = write_layout(layout, tmp_path / "data", *undecodable(kind, bomb))
    splits = build_datasets(DataConfig(**cfg), num_classes=2 if layout == "wds" else None)
    assert isinstance(splits.val[0], Unreadable)  # a stand-in, counted in bad_samples
    assert splits.val[1][1] == 1  # the readable sample beside it
    with pytest.raises(UserError) as failed:  # data.bad_images: fail names the sample, one line
        build_datasets(DataConfig(**cfg, bad_images="fail"), num_classes=2 if layout == "wds" else None).val[0]
    message = str(failed.value)
    assert "unreadable image" in message and sample_names(splits.val)[0] in message and "\n" not in message
    if kind == "bomb":
        assert "pixels" in message and "decompression-bomb" in message


@pytest.mark.parametrize("decode", ["cpu", "device", "dali"])
def test_a_decompression_bomb_stands_in_on_every_decode_path(decode, bomb, tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    (root / "train" / "a" / "bomb.png").write_bytes(bomb)
    code, _, err = cli(capsys, *train_args(root, tmp_path / "runs", f"data.decode={decode}"))
    assert code == 0 and "Traceback" not in err, err
    record = read_metrics(tmp_path / "runs" / "demo")[0]
    assert record["bad_samples"] == 1 and record["samples_seen"] == 11
    if decode == "cpu":
        code, _, err = cli(capsys, *train_args(root, tmp_path / "failed", "data.bad_images=fail"))
        assert code == 2 and f"unreadable image {root / 'train' / 'a' / 'bomb.png'} (" in one_line(err)


def test_device_paths_refuse_a_bomb_before_decoding(bomb, monkeypatch):
    """The header check comes first: torchvision.io and DALI never see the bytes."""
    from pfb_train.data import dali, device_decode

    data = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
    (item,), _, _ = device_decode.collate_bytes([(data, 0, 7)])
    assert isinstance(item, Unreadable) and "pixels" in item.reason
    (item,), _, _, sizes = dali.collate_sized_bytes([(data, 0, 7)])
    assert isinstance(item, Unreadable) and sizes.tolist() == [[0, 0]]
    monkeypatch.setattr(device_decode, "decode_image", lambda *a, **k: pytest.fail("decoded a bomb"))
    loader = device_decode.DeviceDecodeLoader(
        SimpleNamespace(generator=None), "cpu", 16, False, (0.5,) * 3, (0.5,) * 3, paths=["bomb.png"]
    )
    images, good = loader.decode([Unreadable(None, "too many pixels")], torch.tensor([0]))
    assert images == [None] and not good.any()


# ---------------------------------------------------------------- odd pixel modes decode alike


def odd_mode_cases():
    for kind, make in ODD_MODES.items():
        for layout in ("imagefolder", "hf", "wds"):
            if layout != "wds" or make()[1] in WDS_EXTENSIONS:
                yield layout, kind


@pytest.mark.parametrize("layout,kind", list(odd_mode_cases()))
def test_odd_pixel_modes_become_sensible_rgb_on_the_cpu_path(layout, kind, tmp_path):
    data, extension, rgb, tolerance = ODD_MODES[kind]()
    splits = build_datasets(
        DataConfig(**write_layout(layout, tmp_path / "data", data, extension)),
        num_classes=2 if layout == "wds" else None,
    )
    image, label = splits.val[0]  # the eval transform: a uint8 (3, 16, 16) crop of a constant image
    assert image.dtype == torch.uint8 and label == 0
    want = torch.tensor(rgb).view(3, 1, 1).expand_as(image).int()
    assert (image.int() - want).abs().max() <= tolerance, (image[:, 0, 0], rgb)


def test_16_bit_greyscale_gives_the_same_pixels_on_every_decode_path(tmp_path):
    """Two classes, 0x4000 and 0xC000: their top bytes on every path (the cpu path used to clip both to white)."""
    for split in ("train", "val"):
        for name, value in (("dark", 0x4000), ("light", 0xC000)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                grey16(value).save(tmp_path / split / name / f"{i}.png")
    batches = {}
    for decode in ("cpu", "device", "dali"):
        cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=16, batch_size=4, workers=0, decode=decode)
        _, val = build_loaders(build_datasets(cfg), cfg, seed=0)
        ((x, y, _),) = list(val)
        batches[decode] = x
    level = 1.05 / (0.224 * 255)  # one grey level, normalised (by the smallest of timm's ImageNet stds)
    want = (
        torch.tensor([0x40, 0x40, 0xC0, 0xC0]).view(4, 1, 1, 1) / 255
        - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(batches["cpu"], want.expand_as(batches["cpu"]), atol=1e-4)
    assert torch.allclose(batches["device"], batches["cpu"], atol=1e-4)
    assert torch.allclose(batches["dali"], batches["cpu"], atol=level)  # DALI scales by 255/65535: a level off


def test_the_device_path_decodes_what_torchvision_io_does_not_read(tmp_path):
    """A BMP or TIFF trains on the cpu path; the device path decodes it by PIL too, not as a bad file."""
    from pfb_train.data.device_decode import DeviceDecodeLoader

    data, _, rgb, _ = ODD_MODES["tiff_float"]()
    loader = DeviceDecodeLoader(SimpleNamespace(generator=None), "cpu", 16, False, (0.5,) * 3, (0.5,) * 3)
    bmp = encode(Image.new("RGB", (24, 24), (1, 2, 3)), "BMP")
    images, good = loader.decode(
        [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in (data, bmp)], torch.tensor([0, 1])
    )
    assert good.all() and images[0][:, 0, 0].tolist() == list(rgb) and images[1][:, 0, 0].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- layouts people have


def test_images_below_their_class_folder_are_found_as_torchvision_finds_them(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name, value in (("a", 40), ("b", 200)):
            part = root / split / name / "part1"
            part.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (value,) * 3).save(part / f"{i}.png")
    elsewhere = tmp_path / "elsewhere" / "more"  # a linked subfolder counts, as ImageFolder follows links
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (20, 20), (7, 7, 7)).save(elsewhere / "linked.png")
    os.symlink(elsewhere, root / "train" / "a" / "part2")
    splits = build_datasets(DataConfig(dataset="imagefolder", root=str(root), img_size=16, workers=0))
    assert splits.num_classes == 2 and len(splits.train) == 7 and len(splits.val) == 6
    (root / "train" / "c" / "part1").mkdir(parents=True)  # only an empty subfolder: still refused
    (root / "val" / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*/train/c holds no images \(") as refused:
        build_datasets(DataConfig(dataset="imagefolder", root=str(root), img_size=16, workers=0))
    assert "\n" not in str(refused.value)


def write_plain_parquet(root, extra_int_column=False):
    """train/validation Parquet files written by pyarrow alone: image struct<bytes, path>, int64 labels 0..2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split in ("train", "validation"):
        labels = [i % 3 for i in range(6)]
        images = [
            {"bytes": encode(Image.new("RGB", (20, 20), (80 * c,) * 3), "PNG"), "path": f"{i}.png"}
            for i, c in enumerate(labels)
        ]
        columns = {"image": pa.array(images, struct), "label": pa.array(labels, pa.int64())}
        if extra_int_column:
            columns["width"] = pa.array([20] * 6, pa.int64())
        pq.write_table(pa.table(columns), root / f"{split}-00000-of-00001.parquet")
    return root


def test_a_plain_parquet_file_is_read_with_or_without_naming_its_columns(tmp_path):
    root = write_plain_parquet(tmp_path / "plain")
    for keys in ({}, {"image_key": "image", "label_key": "label"}):
        cfg = DataConfig(dataset="hf", root=str(root), img_size=16, workers=0, **keys)
        splits = build_datasets(cfg)
        assert splits.num_classes == 3 and len(splits.train) == 6  # the largest label + 1
        image, label = splits.val[4]
        assert image.shape == (3, 16, 16) and int(image[0, 8, 8]) == 80 and label == 1
    assert build_datasets(cfg, num_classes=5).num_classes == 5  # model.num_classes, when set, wins
    with pytest.raises(UserError, match=r"holds 2, outside 0\.\.1 \(model\.num_classes 2\)"):
        build_datasets(cfg, num_classes=2)
    two = write_plain_parquet(tmp_path / "two", extra_int_column=True)
    with pytest.raises(
        UserError,
        match=r"more than one integer column; set data\.label_key \(columns: image "
        r"\(struct of bytes/path\), label \(int64\), width \(int64\)\)",
    ):
        build_datasets(DataConfig(dataset="hf", root=str(two), img_size=16, workers=0))
    assert (
        build_datasets(DataConfig(dataset="hf", root=str(two), img_size=16, workers=0, label_key="label")).num_classes
        == 3
    )


def test_a_plain_parquet_file_trains_from_the_cli(tmp_path, capsys):
    root = write_plain_parquet(tmp_path / "plain")
    code, _, err = cli(capsys, *train_args(root, tmp_path / "runs", "data.dataset=hf", "data.batch_size=2"))
    assert code == 0, err
    assert read_metrics(tmp_path / "runs" / "demo")[0]["samples_seen"] == 6


@pytest.mark.parametrize("info", [False, True])
def test_dots_in_webdataset_keys_are_one_line_saying_why(info, tmp_path, capsys):
    root = tmp_path / "shards"
    root.mkdir()
    jpeg = encode(Image.new("RGB", (20, 20), (9, 9, 9)), "JPEG")
    for split in ("train", "validation"):
        with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
            for i in range(6):
                add_members(tar, [(f"n01440764_1002{i}.part1.jpg", jpeg), (f"n01440764_1002{i}.part1.cls", b"0")])
    if info:  # timm's layout: the shards are not scanned at the start, the first read finds it
        splits = {
            s: {"filenames": [f"{s}-000000.tar"], "shard_lengths": [6], "num_samples": 6}
            for s in ("train", "validation")
        }
        (root / "_info.json").write_text(json.dumps({"splits": splits, "num_classes": 2}))
    code, _, err = cli(capsys, *wds_args(root, tmp_path / "runs", "model.num_classes=2"))
    line = one_line(err)
    assert code == 2, err
    assert f"shard {root / 'train-000000.tar'} has member 'n01440764_10020.part1.jpg'" in line
    assert "up to the first dot" in line and "replace the dots in the key with underscores" in line


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_corrupt_images_are_stood_in_for_named_and_counted(tmp_path, decode, capsys):
    root = write_image_folder(tmp_path / "data", corrupt=4)  # 16 good + 4 bad = 5 batches of 4: every file visited
    summary = run(
        load_config(
            None,
            [
                *IMAGE_FOLDER_RUN,
                f"data.root={root}",
                f"runtime.output={tmp_path}",
                f"data.decode={decode}",
                "data.mixup=0.2",
                "blocking.method=pfb",
                "blocking.pfb.centres=2",
                "blocking.pfb.ratio=0.25",
                "blocking.pfb.start_epoch=0",
            ],
        )
    )
    record = read_metrics(summary["run_dir"])[0]
    assert record["bad_samples"] == 4 and summary["bad_samples"] == 4
    # full-size batches (mixup needs them); stand-ins are neither kept nor blocked: both fractions are of
    # the 16 readable slots
    assert record["samples_seen"] == 16 and record["samples_pruned"] == 0
    kept = round(record["kept_fraction"] * 16)  # 5 steps x 3 kept rows, less the stand-ins among them
    assert 15 - 4 <= kept <= 15 and kept + record["samples_blocked"] == 16
    assert record["blocked_fraction"] == pytest.approx((16 - kept) / 16) == pytest.approx(1 - record["kept_fraction"])
    # one warning line with the count and the first names; every name in the run's unreadable.txt
    lines = (Path(summary["run_dir"]) / "unreadable.txt").read_text().splitlines()
    assert sorted(lines) == [f"0\t{root}/train/a/bad{i}.jpg" for i in range(4)]
    [warning] = [line for line in capsys.readouterr().out.splitlines() if "unreadable training image" in line]
    assert warning.startswith("warning: epoch 0: 4 unreadable training image(s)")
    assert f"{root}/train/a/bad" in warning and "and 1 more" in warning


def test_an_epoch_without_blocking_keeps_everything_readable(tmp_path):
    """kept_fraction is of the readable slots: with unreadable files and no blocking it is 1."""
    root = write_image_folder(tmp_path / "data", corrupt=4)
    summary = run(
        load_config(None, [*IMAGE_FOLDER_RUN, f"data.root={root}", f"runtime.output={tmp_path}", "schedule.epochs=1"])
    )
    record = read_metrics(summary["run_dir"])[0]
    assert record["bad_samples"] == 4 and record["kept_fraction"] == 1.0 and summary["blocked_fraction"] == 0.0


def test_corrupt_images_fail_the_run_when_configured(tmp_path):
    root = write_image_folder(tmp_path / "data", corrupt=4)  # 20 files, 5 batches of 4: none sits out the epoch
    with pytest.raises(UserError, match=r"unreadable image .*bad\d\.jpg"):
        run(
            load_config(
                None, [*IMAGE_FOLDER_RUN, f"data.root={root}", "data.bad_images=fail", f"runtime.output={tmp_path}"]
            )
        )


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_batch_with_no_readable_image_stops_the_run_with_one_line(tmp_path, decode):
    """An empty batch cannot be trained on (and one DDP rank skipping a step would stall the rest)."""
    root = write_image_folder(tmp_path / "data", corrupt=4)
    for good in (root / "train").rglob("[0-9].jpg"):
        good.unlink()
    (root / "train" / "b" / "bad.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"all 4 images of a batch are unreadable, e.g. .*bad.*\.jpg: check the files"):
        run(
            load_config(
                None, [*IMAGE_FOLDER_RUN, f"data.root={root}", f"data.decode={decode}", f"runtime.output={tmp_path}"]
            )
        )
