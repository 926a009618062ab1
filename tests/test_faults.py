"""Fault injection: what a user with real, slightly dirty data and a real cluster runs into.

Every case asserts the exit code, that stderr holds one `pfb-train:` line and no traceback, and
that nothing finished is lost (the run finishes, or its checkpoints and metrics are still there).
The bad-input table of docs/operations.md lists each case with what the user sees. Cases marked `slow` start
subprocesses (signals, torchrun); they run in CI too.
"""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfb_train.run_dir import UNREADABLE_FILE, read_metrics
from helpers import folder_to_shards, cli, jpeg_bytes, one_line, train_args, wds_args, write_folder

HERE = Path(__file__).resolve().parent


def odd_image(kind: str, path_stem: Path) -> Path:
    """One unusual file in the training set, by kind."""
    rng = np.random.default_rng(1)
    if kind == "zero_bytes":
        path = path_stem.with_suffix(".jpg")
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        path = path_stem.with_suffix(".jpg")
        data = jpeg_bytes(rng.integers(0, 255, (64, 64, 3), np.uint8))
        path.write_bytes(data[: len(data) // 3])
    elif kind == "not_an_image":
        path = path_stem.with_suffix(".jpg")
        path.write_text("these are notes, saved with the wrong suffix\n")
    elif kind == "cmyk_jpeg":
        path = path_stem.with_suffix(".jpg")
        Image.new("CMYK", (24, 24), (10, 200, 30, 0)).save(path)
    elif kind == "png_16_bit":
        path = path_stem.with_suffix(".png")
        Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(path)
    elif kind == "rgba_png":
        path = path_stem.with_suffix(".png")
        Image.fromarray(rng.integers(0, 255, (24, 24, 4), np.uint8), "RGBA").save(path)
    elif kind == "one_pixel":
        path = path_stem.with_suffix(".jpg")
        Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    elif kind == "huge_6000px":
        path = path_stem.with_suffix(".jpg")
        Image.new("RGB", (6000, 6000), (90, 120, 30)).save(path, quality=50)
    else:
        raise ValueError(kind)
    return path


UNREADABLE = ["zero_bytes", "truncated_jpeg", "not_an_image"]
READABLE = ["cmyk_jpeg", "png_16_bit", "rgba_png", "one_pixel", "huge_6000px"]


@pytest.mark.parametrize("decode", ["cpu", "device", "dali"])
def test_unusual_images_never_end_the_run(decode, tmp_path, capsys):
    """Every kind of odd file at once, one run per decode path: the unreadable ones are counted and named,
    the readable ones train, and every file is visited."""
    root = write_folder(tmp_path / "data")
    for kind in UNREADABLE + READABLE:
        odd_image(kind, root / "train" / "a" / f"odd_{kind}")
    shutil.copy(root / "train" / "b" / "0.jpg", root / "train" / "b" / "extra.jpg")  # 20 files: 5 full batches
    code, out, err = cli(capsys, *train_args(root, tmp_path / "runs", f"data.decode={decode}"))
    assert code == 0 and "Traceback" not in err, err
    record = read_metrics(tmp_path / "runs" / "demo")[0]
    assert record["bad_samples"] == len(UNREADABLE)
    assert record["samples_seen"] + record["bad_samples"] == 20  # full batches: every file once
    named = (tmp_path / "runs" / "demo" / UNREADABLE_FILE).read_text()
    assert sorted(line.split("\t")[1].split("/")[-1].split(".")[0] for line in named.splitlines()) == sorted(
        f"odd_{kind}" for kind in UNREADABLE
    )


def test_unicode_and_spaces_in_paths(tmp_path, capsys):
    root = write_folder(tmp_path / "dätä sets" / "ImageNet – mini")
    os.rename(root / "train" / "a", root / "train" / "clàss a")
    os.rename(root / "val" / "a", root / "val" / "clàss a")
    code, _, err = cli(capsys, *train_args(root, tmp_path / "rüns out"))
    assert code == 0, err
    assert read_metrics(tmp_path / "rüns out" / "demo")[0]["bad_samples"] == 0


def test_a_symlink_loop_in_the_data_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    os.symlink("..", root / "train" / "a" / "loop")
    code, _, err = cli(capsys, *train_args(root, tmp_path / "runs"))
    assert code == 2 and "symbolic link loop in the data folder" in one_line(err)


def test_an_empty_class_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    code, _, err = cli(capsys, *train_args(root, tmp_path / "runs"))
    assert code == 2 and "holds no images" in one_line(err)


def test_val_classes_differ_from_train(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    os.rename(root / "val" / "b", root / "val" / "bee")
    code, _, err = cli(capsys, *train_args(root, tmp_path / "runs"))
    assert code == 2 and "have different class folders" in one_line(err)


# ---------------------------------------------------------------- WebDataset shards (data.dataset: wds)


def make_shards(tmp_path) -> Path:
    """A folder of real JPEGs (12 train, 12 val) written as shards of 4 by `pfb-train shards`."""
    folder = write_folder(tmp_path / "folder")
    odd_image("one_pixel", folder / "train" / "b" / "extra")
    return folder_to_shards(folder, tmp_path / "shards", 4)


def rewrite_shard(path: Path, change) -> None:
    """Write the shard again with `change(members)` applied to its list of (name, bytes)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def set_member(extension: str, data: bytes):
    """A change that gives the shard's first sample's `extension` member these bytes."""

    def change(members):
        first = members[0][0].split(".")[0]
        return [(n, data if n == f"{first}.{extension}" else d) for n, d in members]

    return change


def test_shards_needs_the_webdataset_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if it were not installed
    code, _, err = cli(
        capsys,
        "shards",
        "--config",
        "demo",
        "--set",
        "data.dataset=imagefolder",
        "--set",
        f"data.root={write_folder(tmp_path / 'folder')}",
        "--out",
        str(tmp_path / "shards"),
    )
    assert code == 2 and "needs the webdataset package: pip install 'pfb-train[data]'" in one_line(err)


@pytest.mark.parametrize(
    "fault,message",
    [
        ("missing_split", "split 'test' not found in"),
        ("missing_shard", "shard file not found:"),
        ("truncated_shard", "is truncated"),
        ("label_outside_num_classes", "has label 7, outside 0..1 (model.num_classes 2)"),
        ("info_not_json", "_info.json is not valid JSON"),
    ],
)
def test_shard_mistakes_are_one_line(fault, message, tmp_path, capsys):
    root = make_shards(tmp_path)
    extra = []
    if fault == "missing_split":
        extra = ["data.val_split=test"]
    elif fault == "missing_shard":
        (root / "train-000001.tar").unlink()
    elif fault == "truncated_shard":
        data = (root / "train-000001.tar").read_bytes()
        (root / "train-000001.tar").write_bytes(data[: len(data) * 2 // 3])
    elif fault == "label_outside_num_classes":
        rewrite_shard(root / "train-000001.tar", set_member("cls", b"7"))
    else:
        (root / "_info.json").write_text("{ not json")
    code, _, err = cli(capsys, *wds_args(root, tmp_path / "runs", *extra))
    assert code == 2 and message in one_line(err)


@pytest.mark.parametrize("decode", ["cpu", "device", "dali"])
@pytest.mark.parametrize("fault", ["image_does_not_decode", "cls_is_not_a_number", "shorter_than_info_says"])
def test_a_broken_sample_in_a_shard_is_counted_not_fatal(fault, decode, tmp_path, capsys):
    root = make_shards(tmp_path)
    if fault == "image_does_not_decode":
        rewrite_shard(root / "train-000000.tar", set_member("jpg", b"not a jpeg"))
    elif fault == "cls_is_not_a_number":
        rewrite_shard(root / "train-000000.tar", set_member("cls", b"cat"))
    else:  # a timm-made _info.json (no shard_bytes) that promises one sample more than the shard holds
        rewrite_shard(root / "train-000000.tar", lambda members: members[2:])
        info = json.loads((root / "_info.json").read_text())
        del info["splits"]["train"]["shard_bytes"]
        (root / "_info.json").write_text(json.dumps(info))
    code, _, err = cli(capsys, *wds_args(root, tmp_path / "runs", f"data.decode={decode}"))
    assert code == 0 and "Traceback" not in err, err
    record = read_metrics(tmp_path / "runs" / "demo")[0]
    assert record["bad_samples"] == 1 and record["samples_seen"] == 11


@pytest.mark.parametrize(
    "fault,note",
    [
        ("info_absent", "_info.json in {root}: counted split 'train' from its 3 shard(s) instead (12 samples)"),
        ("shard_replaced", "_info.json says train-000001.tar has"),
        ("count_disagrees", "_info.json gives num_samples 13 but its shard_lengths add up to 12"),
    ],
)
def test_an_absent_or_disagreeing_info_file_is_counted_once_and_said(fault, note, tmp_path, capsys):
    root = make_shards(tmp_path)
    info = json.loads((root / "_info.json").read_text())
    if fault == "info_absent":
        (root / "_info.json").unlink()
    elif fault == "shard_replaced":  # one sample fewer than _info.json gives it: counted, none missing
        rewrite_shard(root / "train-000001.tar", lambda members: members[2:])
    else:
        info["splits"]["train"]["num_samples"] = 13
        (root / "_info.json").write_text(json.dumps(info))
    code, out, err = cli(capsys, *wds_args(root, tmp_path / "runs", "model.num_classes=2"))
    assert code == 0, err
    assert out.count(note.format(root=root)) == 1 and "Traceback" not in err
    record = read_metrics(tmp_path / "runs" / "demo")[0]
    assert record["bad_samples"] == 0
    assert record["samples_seen"] == (10 if fault == "shard_replaced" else 12)


# ---------------------------------------------------------------- checkpoints and resuming

DEMO = [
    "--config",
    "demo",
    "--set",
    "schedule.epochs=2",
    "--set",
    "runtime.progress=false",
    "--set",
    "data.train_samples=128",
    "--set",
    "data.val_samples=64",
    "--set",
    "data.batch_size=32",
    "--set",
    "blocking.pfb.start_epoch=0",
    "--set",
    "blocking.pfb.centres=8",
]


def finished_run(capsys, out, *extra):
    code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={out}", *extra)
    assert code == 0, err
    return out / "demo"


def test_a_truncated_last_checkpoint_resumes_from_the_previous(tmp_path, capsys):
    run_dir = finished_run(capsys, tmp_path)
    last = run_dir / "checkpoint-last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    code, _, err = cli(
        capsys, *DEMO, "--set", f"runtime.output={tmp_path}", "--set", "schedule.epochs=3", "--resume", "auto"
    )
    assert code == 0 and "skipping unreadable checkpoint" in one_line(err)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1, 2]  # epoch 1 again, from checkpoint-prev


def test_both_checkpoints_unreadable_stops_instead_of_starting_over(tmp_path, capsys):
    run_dir = finished_run(capsys, tmp_path)
    for name in ("checkpoint-last.pt", "checkpoint-prev.pt"):
        (run_dir / name).write_bytes(b"garbage")
    before = (run_dir / "metrics.jsonl").read_text()
    code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={tmp_path}", "--resume", "auto")
    assert code == 2
    assert "no checkpoint in" in [line for line in err.splitlines() if "error" in line][0]
    assert (run_dir / "metrics.jsonl").read_text() == before  # the logged epochs are still there


@pytest.mark.parametrize(
    "change,key", [("model.name=resnet34", "model.name"), ("blocking.method=random", "blocking.method")]
)
def test_resuming_with_a_changed_model_or_method(change, key, tmp_path, capsys):
    run_dir = finished_run(capsys, tmp_path)
    code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={tmp_path}", "--set", change, "--resume", "auto")
    assert code == 2 and f"cannot resume: the checkpoint was trained with {key}" in one_line(err)
    assert (run_dir / "checkpoint-last.pt").is_file()


def test_an_output_folder_that_cannot_be_made(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={tmp_path / 'a_file' / 'runs'}")
    assert code == 2 and "a_file" in one_line(err)


def _tmpfs(path: Path, size: str, options: str = "") -> bool:
    path.mkdir()
    opts = f"size={size}" + (f",{options}" if options else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_read_only_output_folder(tmp_path, capsys):
    mount = tmp_path / "ro"
    if not _tmpfs(mount, "1m", "ro"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={mount}")
        assert code == 2 and "Read-only file system" in one_line(err)
    finally:
        subprocess.run(["umount", str(mount)])


def test_a_full_output_folder_keeps_the_checkpoints_already_written(tmp_path, capsys):
    mount = tmp_path / "small"
    if not _tmpfs(mount, "600k"):
        pytest.skip("cannot mount a tmpfs here")
    try:  # demo's resnet18 checkpoint is ~4 MB: no checkpoint fits; the run stops at its first
        code, _, err = cli(capsys, *DEMO, "--set", f"runtime.output={mount}", "--set", "model.name=resnet10t")
        assert code == 2 and "cannot write a checkpoint in" in one_line(err)
        assert not list((mount / "demo").glob(".checkpoint*.tmp"))  # no half-written file left behind
    finally:
        subprocess.run(["umount", str(mount)])


# ---------------------------------------------------------------- config and report mistakes


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "{tmp}/a.yaml"], "loops back"),
        (["--config", "demo", "--set", "schedule.epochs"], "--set expects key=value"),
        (["--config", "demo", "--set", "name=runs/evil"], "config key 'name' must be a plain folder name"),
        (["--config", "demo", "--set", "name=.."], "config key 'name' must be a plain folder name"),
        (["report", "{tmp}/nowhere", "--baseline", "{tmp}/nowhere"], "not a finished run directory"),
        (["report", "{tmp}/empty", "--baseline", "{tmp}/empty"], "not a finished run directory"),
        (["report", "{tmp}/unfinished", "--baseline", "{tmp}/unfinished"], "not a finished run directory"),
    ],
)
def test_config_and_report_mistakes(args, message, tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    code, _, err = cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and message in one_line(err)


# ---------------------------------------------------------------- signals and multi-process stops


def popen(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,
    )


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_auto(tmp_path):
    """Killed without warning, twice, with a checkpoint every step: each epoch is logged once and the run ends."""
    args = [
        "-m",
        "pfb_train",
        *DEMO,
        "--set",
        f"runtime.output={tmp_path}",
        "--set",
        "schedule.epochs=3",
        "--set",
        "runtime.checkpoint_every=1",
        "--resume",
        "auto",
    ]
    rng = random.Random(0)
    for _ in range(2):
        proc = popen(*args)
        for line in proc.stdout:  # kill somewhere in the first or second epoch
            if line.startswith("run demo"):
                time.sleep(rng.uniform(0.5, 2.5))
                break
        proc.kill()
        proc.wait(timeout=60)
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "demo")] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["first_step", "evaluation"])
def test_sigterm_during_the_first_step_or_evaluation(moment, tmp_path):
    args = [
        str(HERE / "signal_worker.py"),
        moment,
        "--",
        *DEMO,
        "--set",
        f"runtime.output={tmp_path}",
        "--resume",
        "auto",
    ]
    first = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr
    # during the evaluation: the stop comes right after the epoch's checkpoint, not a step later
    where = "at epoch 0, step 1;" if moment == "first_step" else "after epoch 0, step"
    assert f"stopped by SIGTERM {where}" in one_line(first.stderr)
    again = subprocess.run([sys.executable, "-m", "pfb_train", *args[3:]], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "demo")] == [0, 1]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP_CONFIG = """name: ddp
model: {name: test_resnet}
blocking: {method: pfb, pfb: {ratio: 0.25, start_epoch: 0, centres: 8, feature_dim: 16}}
data: {dataset: synthetic, img_size: 16, batch_size: 8, train_samples: 96, val_samples: 16, workers: 0}
optim: {lr: 0.05}
schedule: {epochs: 2, warmup_epochs: 0}
runtime: {device: cpu, seed: 0, progress: false, threads: 1}
"""


def torchrun_with_faults(tmp_path, faults: str) -> subprocess.CompletedProcess:
    """A 2-process torchrun job of DDP_CONFIG with `faults` injected on rank 1 (tests/fault_worker.py)."""
    (tmp_path / "ddp.yaml").write_text(DDP_CONFIG)
    worker = [str(HERE / "fault_worker.py"), faults, "1", "--"]
    args = ["--config", str(tmp_path / "ddp.yaml"), "--set", f"runtime.output={tmp_path}"]
    return subprocess.run([*TORCHRUN, *worker, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "fault,code,message",
    [
        ("data", 2, "pfb-train: error: all 8 images of a batch are unreadable, e.g. /data/bad.jpg (on rank 1)"),
        ("bug", 1, "pfb-train: stopped: ZeroDivisionError: injected (on rank 1)"),
    ],
)
def test_a_fault_on_one_rank_stops_every_rank_with_the_same_line(fault, code, message, tmp_path):
    started = time.monotonic()
    result = torchrun_with_faults(tmp_path, fault)
    assert time.monotonic() - started < 60  # promptly: no collective timeout
    # both ranks, one line each (counted, not split: two processes may write to stderr at the same moment)
    assert result.stderr.count(message) == 2 and result.stderr.count("pfb-train:") == 2, result.stderr[-2000:]
    assert "pfb_train/" not in result.stderr  # no traceback through the workers' code
    assert f"exitcode  : {code}" in result.stderr and "exitcode  : 0" not in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("faults", ["data+echo", "data+bug"])
def test_two_errors_at_once_still_give_every_rank_one_line(faults, tmp_path):
    """The first announcement stands on every rank: an error that is the echo of another rank's stop
    (a collective on an aborted group), or a second real error at the same moment, does not replace it."""
    result = torchrun_with_faults(tmp_path, faults)
    data = "pfb-train: error: all 8 images of a batch are unreadable, e.g. /data/bad.jpg (on rank 1)"
    bug = "pfb-train: stopped: ValueError: injected at the same time (on rank 0)"
    # counted, not split into lines: two processes may write to stderr at the same moment
    assert result.stderr.count("pfb-train:") == 2, result.stderr[-3000:]
    assert result.stderr.count(data) == 2 or (faults == "data+bug" and result.stderr.count(bug) == 2), result.stderr[
        -3000:
    ]
    assert "pfb_train/" not in result.stderr and "exitcode  : 0" not in result.stderr


# A cluster's preemption as torchrun passes it on: to each rank's whole process group, DataLoader
# workers included (imagefolder JPEGs, so the loaders have workers; 49 files: 6 steps of 2 x 4 per epoch).
FOLDER_DDP_CONFIG = """name: ddp
model: {name: test_resnet, num_classes: null}
blocking: {method: pfb, pfb: {ratio: 0.25, start_epoch: 0, centres: 4, feature_dim: 8}}
data: {dataset: imagefolder, batch_size: 4, img_size: 16, workers: 2}
optim: {lr: 0.05}
schedule: {epochs: 3, warmup_epochs: 0}
runtime: {device: cpu, seed: 0, progress: false, threads: 1}
"""


def without_timings(records: list) -> list:
    """Epoch records without their clock readings (`*_seconds`, `images_per_second`)."""
    return [{k: v for k, v in r.items() if "second" not in k} for r in records]


@pytest.mark.distributed
def test_a_torchrun_job_with_loader_workers_preempted_twice_then_resumed_exactly(tmp_path):
    """SIGTERM inside an epoch (at the next check), then in the last epoch (at its last step, before the
    evaluation): every rank stops at the same step with one line, and the resumed run is the
    uninterrupted one, every rank's noise streams and BatchNorm statistics included."""
    (tmp_path / "ddp.yaml").write_text(FOLDER_DDP_CONFIG)
    args = [
        "--config",
        str(tmp_path / "ddp.yaml"),
        "--set",
        f"data.root={write_folder(tmp_path / 'data', per_class=25)}",
    ]
    whole = subprocess.run(
        [*TORCHRUN, "-m", "pfb_train", *args, "--set", f"runtime.output={tmp_path / 'whole'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    args += ["--set", f"runtime.output={tmp_path}", "--resume", "auto"]
    # (step of this launch at which rank 0 signals torchrun, runtime.log_every, where every rank stops)
    for signal_at, log_every, stop in [(3, 2, "at epoch 0, step 4"), (10, 50, "at epoch 2, step 18")]:
        cut = subprocess.run(
            [
                *TORCHRUN,
                str(HERE / "signal_worker.py"),
                f"step={signal_at}",
                "--",
                *args,
                "--set",
                f"runtime.log_every={log_every}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = f"pfb-train: stopped by SIGTERM {stop}; checkpoint saved in {tmp_path / 'ddp'};"
        assert cut.stderr.count(line) == 2 and cut.stderr.count("pfb-train:") == 2, cut.stderr[-3000:]
        assert "DataLoader worker" not in cut.stderr and "pfb_train/" not in cut.stderr  # (torchrun prints its own)
    again = subprocess.run([*TORCHRUN, "-m", "pfb_train", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert without_timings(read_metrics(tmp_path / "ddp")) == without_timings(read_metrics(tmp_path / "whole" / "ddp"))
