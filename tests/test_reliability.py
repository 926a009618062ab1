"""Resumable, preemption-safe runs; bad data and non-finite losses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfb_train.checkpoint import latest_checkpoint, save_atomic
from pfb_train.config import load_config
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.train import fit, run, setup
from pfb_train.distributed import DistInfo
from helpers import assert_same_training_state, final_state

TINY = [
    "model.name=test_resnet",
    "model.drop_rate=0.2",
    "data.dataset=synthetic",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=96",
    "data.val_samples=32",
    "data.workers=0",
    "data.mixup=0.4",
    "schedule.epochs=4",
    "schedule.warmup_epochs=1",
    "runtime.progress=false",
    "runtime.device=cpu",
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


def test_resume_after_epoch_two_is_exact(tmp_path):
    whole = run(load_config(None, [*TINY, f"runtime.output={tmp_path}/a"]))

    first = setup(load_config(None, [*TINY, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_epoch=2)  # stops after epoch index 1, as a preempted job would
    assert final_state(first.run_dir)["epoch"] == 2
    resumed = run(load_config(None, [*TINY, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))

    assert resumed["run_dir"] == str(first.run_dir)  # same run directory, continued
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))
    records = read_metrics(resumed["run_dir"])
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert resumed["top1"] == whole["top1"] and resumed["blocked_fraction"] == whole["blocked_fraction"]


def test_resume_mid_epoch_from_step_checkpoint_is_exact(tmp_path):
    steps = ["runtime.checkpoint_every=4"]  # 6 steps per epoch: a checkpoint inside every epoch
    whole = run(load_config(None, [*TINY, *steps, f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*TINY, *steps, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_step=10)  # epoch 1, batch 4 of 6
    saved = final_state(first.run_dir)
    assert (saved["epoch"], saved["step"]) == (1, 10)
    resumed = run(load_config(None, [*TINY, *steps, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))
    a, b = read_metrics(whole["run_dir"]), read_metrics(resumed["run_dir"])
    # the epoch's tallies (rows per class, loss, what decided the selection) survive the interruption
    for key in (
        "samples_blocked",
        "train_loss",
        "class_kept_fraction",
        "selection_signal",
        "blocked_density_q50",
        "val_class_top1",
    ):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert a[1]["selection_signal"] is not None


def test_resume_mid_epoch_with_workers_and_random_crops_is_exact(tmp_path):
    """Workers restart on resume; each sample's crop and flip are seeded by (epoch, index), so nothing changes."""
    from helpers import write_smooth_folder

    write_smooth_folder(tmp_path / "data", per_class=10)  # 20 images: 5 steps of 4 per epoch
    cfg = [
        "model.name=test_resnet",
        "data.dataset=imagefolder",
        f"data.root={tmp_path}/data",
        "data.img_size=32",
        "data.batch_size=4",
        "data.workers=2",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "runtime.progress=false",
        "runtime.device=cpu",
        "blocking.method=pfb",
        "blocking.pfb.ratio=0.25",
        "blocking.random.ratio=0.25",
        "blocking.infobatch.prune_ratio=0.25",
        "blocking.static_random.drop_fraction=0.25",
        "blocking.pfb.centres=4",
        "runtime.checkpoint_every=3",
        "name=folder",
    ]
    whole = run(load_config(None, [*cfg, f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*cfg, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_step=6)  # epoch 1, batch 1 of 5
    assert (final_state(first.run_dir)["epoch"], final_state(first.run_dir)["step"]) == (1, 6)
    resumed = run(load_config(None, [*cfg, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path, capsys):
    first = setup(load_config(None, [*TINY, f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_epoch=2)
    last = first.run_dir / "checkpoint-last.pt"
    assert (first.run_dir / "checkpoint-prev.pt").is_file()
    last.write_bytes(last.read_bytes()[:1000])  # torn file, as a full disk would leave
    path, state = latest_checkpoint(first.run_dir)
    assert path.name == "checkpoint-prev.pt" and state["epoch"] == 1
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    resumed = run(load_config(None, [*TINY, f"runtime.output={tmp_path}", "runtime.resume=auto"]))
    assert [r["epoch"] for r in read_metrics(resumed["run_dir"])] == [0, 1, 2, 3]  # epoch 1 redone once


def test_resume_auto_without_checkpoint_starts_fresh_but_an_explicit_path_must_exist(tmp_path):
    summary = run(
        load_config(
            None,
            [
                *TINY,
                f"runtime.output={tmp_path}",
                "runtime.resume=auto",
                "schedule.epochs=1",
                "blocking.pfb.start_epoch=0",
                "blocking.random.start_epoch=0",
            ],
        )
    )
    assert summary["run_dir"] == str(tmp_path / "tiny")
    with pytest.raises(UserError, match="cannot resume from .*nothing.pt: no readable checkpoint"):
        run(load_config(None, [*TINY, f"runtime.output={tmp_path}", f"runtime.resume={tmp_path}/nothing.pt"]))


WRITER = """
import sys, torch
from pfb_train.checkpoint import save_atomic
save_atomic({"payload": torch.ones(80_000_000), "tag": "new"}, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "checkpoint-last.pt"
    save_atomic({"tag": "old"}, target)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint-last.pt.*")) and time.time() < deadline:
        time.sleep(0.01)  # the temporary file exists: the write is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(target, weights_only=False)["tag"] in ("old", "new")  # never a torn file
    path, state = latest_checkpoint(tmp_path)
    assert path == target


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pfb_train",
        "--config",
        "demo",
        "--set",
        f"runtime.output={tmp_path}",
        "--set",
        "schedule.epochs=30",
        "--set",
        "runtime.progress=false",
        "--set",
        "model.name=test_resnet",
        "--resume",
        "auto",
    ]  # test_resnet: the demo's data and recipe at a fraction of resnet18's time
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    for line in proc.stdout:
        if line.startswith("epoch 0:"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err
    saved = final_state(tmp_path / "demo")
    assert 1 <= saved["epoch"] < 30
    args[args.index("schedule.epochs=30")] = "schedule.epochs=3"  # finish quickly
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "demo")][-1] == 2


def write_folder(root, corrupt=0):
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


FOLDER = [
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


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_corrupt_images_are_stood_in_for_named_and_counted(tmp_path, decode, capsys):
    root = write_folder(tmp_path / "data", corrupt=4)  # 16 good + 4 bad = 5 batches of 4: every file visited
    summary = run(
        load_config(
            None,
            [
                *FOLDER,
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
    root = write_folder(tmp_path / "data", corrupt=4)
    summary = run(load_config(None, [*FOLDER, f"data.root={root}", f"runtime.output={tmp_path}", "schedule.epochs=1"]))
    record = read_metrics(summary["run_dir"])[0]
    assert record["bad_samples"] == 4 and record["kept_fraction"] == 1.0 and summary["blocked_fraction"] == 0.0


def test_corrupt_images_fail_the_run_when_configured(tmp_path):
    root = write_folder(tmp_path / "data", corrupt=4)  # 20 files, 5 batches of 4: none sits out the epoch
    with pytest.raises(UserError, match=r"unreadable image .*bad\d\.jpg"):
        run(load_config(None, [*FOLDER, f"data.root={root}", "data.bad_images=fail", f"runtime.output={tmp_path}"]))


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_batch_with_no_readable_image_stops_the_run_with_one_line(tmp_path, decode):
    """An empty batch cannot be trained on (and one DDP rank skipping a step would stall the rest)."""
    root = write_folder(tmp_path / "data", corrupt=4)
    for good in (root / "train").rglob("[0-9].jpg"):
        good.unlink()
    (root / "train" / "b" / "bad.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"all 4 images of a batch are unreadable, e.g. .*bad.*\.jpg: check the files"):
        run(load_config(None, [*FOLDER, f"data.root={root}", f"data.decode={decode}", f"runtime.output={tmp_path}"]))


def poison(state, rows):
    """Make some training images NaN: their batches give a non-finite loss."""
    images = state.train_loader.dataset.dataset.tensors[0]
    images[rows] = float("nan")


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    # reuse: the whole batch goes through the shallow part with gradients, so the NaN sample makes
    # its batch's loss non-finite whether or not it is then blocked
    state = setup(
        load_config(
            None,
            [
                *TINY,
                f"runtime.output={tmp_path}",
                "schedule.epochs=1",
                "blocking.pfb.start_epoch=0",
                "blocking.random.start_epoch=0",
                "data.mixup=0.0",
                "blocking.mode=reuse",
            ],
        ),
        DistInfo(),
    )
    before = {k: v.clone() for k, v in state.net.state_dict().items()}
    poison(state, [0])  # one sample: exactly one batch per epoch is non-finite
    summary = fit(state)
    record = read_metrics(summary["run_dir"])[0]
    assert record["nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state.net.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in state.net.state_dict().items())


def test_run_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path):
    state = setup(load_config(None, [*TINY, f"runtime.output={tmp_path}", "runtime.max_nonfinite=3"]), DistInfo())
    poison(state, slice(None))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        fit(state)


def test_the_nonfinite_streak_counts_across_epochs_and_a_resume(tmp_path, capsys):
    """Every step non-finite, 6 per epoch, runtime.max_nonfinite 8: the run stops 2 steps into epoch 1, also
    when resumed between the epochs; the epoch whose every step was skipped reports no loss (not 0.0)."""
    config = [*TINY, f"runtime.output={tmp_path}", "runtime.max_nonfinite=8", "data.mixup=0.0"]
    state = setup(load_config(None, config), DistInfo())
    poison(state, slice(None))
    fit(state, until_epoch=1)
    record = read_metrics(state.run_dir)[0]
    assert record["nonfinite_steps"] == 6 and record["train_loss"] is None
    assert "epoch 0: loss -  top-1" in capsys.readouterr().out
    resumed = setup(load_config(None, [*config, "runtime.resume=auto"]), DistInfo())
    poison(resumed, slice(None))
    with pytest.raises(
        RuntimeError,
        match=r"8 non-finite losses in a row \(epoch 1, batch 2\): lower optim.lr, "
        r"set optim.clip_grad, or check the data",
    ):
        fit(resumed)
    inside = setup(load_config(None, [*config, "name=inside", "runtime.max_nonfinite=100"]), DistInfo())
    poison(inside, slice(None))
    fit(inside, until_step=7)  # inside epoch 1: the checkpoint holds the live streak, for every rank's resume
    assert latest_checkpoint(inside.run_dir)[1]["nonfinite_in_row"] == 7


def test_without_the_per_step_check_a_nonfinite_epoch_stops_the_run(tmp_path):
    """runtime.check_finite: false (the CUDA default) has no per-step sync; the epoch's loss sum catches it."""
    state = setup(
        load_config(None, [*TINY, f"runtime.output={tmp_path}", "runtime.check_finite=false", "data.mixup=0.0"]),
        DistInfo(),
    )
    assert state.settings.step_settings.check_finite is False
    poison(state, [0])
    with pytest.raises(RuntimeError, match="training loss of epoch 0 is not finite"):
        fit(state)
    assert not (state.run_dir / "metrics.jsonl").exists()  # the epoch was not logged as if it had trained


def test_check_finite_default_is_on_for_the_cpu(tmp_path):
    state = setup(load_config(None, [*TINY, f"runtime.output={tmp_path}"]), DistInfo())
    assert state.cfg.runtime.check_finite is None and state.settings.step_settings.check_finite is True


# ---------------------------------------------------------------- signals to a process group, per-rank state


def test_loader_workers_live_through_a_stop_signal_sent_to_the_whole_job(tmp_path):
    """A scheduler or torchrun signals every process of the job (a terminal's Ctrl-C, the foreground group):
    the loader's workers go on (the training process stops at its next check, after a checkpoint),
    instead of dying and failing the run."""
    import multiprocessing

    write_folder(tmp_path / "data")  # 16 training images: 4 batches of 4
    state = setup(
        load_config(None, [*FOLDER, f"data.root={tmp_path}/data", "data.workers=2", f"runtime.output={tmp_path}"]),
        DistInfo(),
    )
    batches = iter(state.train_loader)
    next(batches)  # the workers have started (with the first batch, maybe not each one's setup)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker, sig in zip(workers, ("TERM", "INT")):  # from another process: `kill`, `scancel`, torchrun's agent
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert len(list(batches)) == 3 and all(w.is_alive() for w in workers)


def _mark_worker(folder: str, worker_id: int) -> None:
    open(f"{folder}/init{worker_id}", "w").close()


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_loader_workers_run_the_callers_init_and_end_when_the_training_process_asks(context, tmp_path):
    """A caller's `worker_init_fn` still runs; the training process's own SIGTERM ends a worker at once
    (forkserver: PyTorch's own handling, which ends a worker on any sender but its parent)."""
    import functools

    from pfb_train.preemption import StopSafeDataLoader

    loader = StopSafeDataLoader(
        list(range(8)),
        batch_size=2,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context=context,
        worker_init_fn=functools.partial(_mark_worker, str(tmp_path)),
    )
    batches = iter(loader)
    next(batches)
    assert (tmp_path / "init0").exists()
    [worker] = batches._workers  # (PyTorch's iterator's list of its worker processes)
    worker.terminate()
    worker.join(timeout=20)
    assert worker.exitcode == (0 if context == "fork" else -signal.SIGTERM)


EXIT_WITH_LIVE_WORKERS = """
import sys
from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.train import setup
state = setup(load_config(None, sys.argv[1:]), DistInfo())
next(iter(state.train_loader))
state.cycle = state  # kept alive to the interpreter's exit, as by a failed test's frames or a notebook
print("exiting", flush=True)
"""


@pytest.mark.slow
def test_a_process_exits_while_its_loader_workers_are_alive(tmp_path):
    """The workers drop a stop signal from others, not their own training process's: the interpreter's
    exit ends them (multiprocessing terminates them) instead of waiting for them forever."""
    write_folder(tmp_path / "data")
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            EXIT_WITH_LIVE_WORKERS,
            *FOLDER,
            f"data.root={tmp_path}/data",
            "data.workers=2",
            f"runtime.output={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - started < 60


def _ranks_selectors():
    """Two PFB selectors as two ranks hold them mid-epoch: their own noise drawn, their own steps tallied."""
    from pfb_train.selection import build_selector

    ranks = [build_selector("pfb", ratio=0.25, centres=4, feature_dim=8, seed=seed, num_classes=2) for seed in (0, 1)]
    g = torch.Generator().manual_seed(0)
    for steps, selector in zip((2, 3), ranks):
        selector.set_epoch(0)
        for _ in range(steps):
            feats = torch.randn(16, 8, generator=g)
            labels = torch.arange(16) % 2
            keep = selector.select(feats, labels)
            selector.observe(feats, keep, keep, torch.zeros(12), labels[keep])
    return ranks


@pytest.mark.parametrize("world_size,rank", [(2, 1), (1, 0), (4, 0), (4, 3)])
def test_each_rank_resumes_its_own_selector_streams_and_tallies(world_size, rank):
    """Same number of processes: every rank its own generators and diagnostics tallies. Another one: the
    streams restart from the seed, and rank 0 takes the sum of the tallies (they are summed over ranks)."""
    from types import SimpleNamespace

    from pfb_train.resume import _load_selector
    from pfb_train.selection import build_selector

    saved = _ranks_selectors()
    whole = [s.state_dict() for s in saved]
    checkpoint = {**whole[0], "per_rank": [{k: w[k] for k in saved[0].rank_local} for w in whole]}
    fresh = build_selector("pfb", ratio=0.25, centres=4, feature_dim=8, seed=rank, num_classes=2)
    fresh.generator(torch.device("cpu"))  # as a fresh run holds it once it has drawn
    initial_streams = fresh.state_dict()["generators"]
    state = SimpleNamespace(selector=fresh, settings=SimpleNamespace(dist=DistInfo(rank=rank, world_size=world_size)))
    _load_selector(state, checkpoint)
    loaded = fresh.state_dict()
    assert torch.equal(loaded["centres"], whole[0]["centres"])  # shared: rank 0's
    assert torch.equal(loaded["class_history"]["hist"], whole[0]["class_history"]["hist"])  # shared too
    if world_size == 2:
        assert torch.equal(loaded["generators"]["cpu"], whole[rank]["generators"]["cpu"])
        assert loaded["stats"]["steps"] == whole[rank]["stats"]["steps"] == 3
        return
    assert torch.equal(loaded["generators"]["cpu"], initial_streams["cpu"])
    assert loaded["stats"]["steps"] == (2 + 3 if rank == 0 else 0)
    if rank == 0:
        assert torch.allclose(loaded["stats"]["totals"], whole[0]["stats"]["totals"] + whole[1]["stats"]["totals"])


def test_a_methods_own_rank_local_entries_restart_with_another_number_of_processes():
    """A method naming its own per-rank entry, resumed on other process counts: every rank gets the value
    it was built with (rank 0 too: the base `merge_rank_states` keeps nothing), not a missing key."""
    from types import SimpleNamespace

    from pfb_train.resume import _load_selector
    from pfb_train.selection.base import Selector

    class SeenRows(Selector):
        rank_local = (*Selector.rank_local, "seen")

        def __init__(self, seen=0):
            super().__init__()
            self.seen = seen

        def state_dict(self):
            return {**super().state_dict(), "seen": self.seen}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.seen = state["seen"]

    checkpoint = {
        **SeenRows(5).state_dict(),
        "per_rank": [{"generators": {}, "seen": 5}, {"generators": {}, "seen": 7}],
    }
    for world_size, rank, seen in [(2, 1, 7), (1, 0, 0), (4, 2, 0)]:
        selector = SeenRows()
        _load_selector(
            SimpleNamespace(
                selector=selector, settings=SimpleNamespace(dist=DistInfo(rank=rank, world_size=world_size))
            ),
            checkpoint,
        )
        assert selector.seen == seen, (world_size, rank)


def test_diagnostics_tallies_resumed_on_the_cpu_join_the_training_device():
    """A checkpoint loads onto the CPU; the next step's tallies come from the device (here `meta`, as CUDA)."""
    from pfb_train.selection.diagnostics import SelectionStats

    stats = SelectionStats()
    stats.load_state_dict({"totals": torch.zeros(7, dtype=torch.float64), "blocked": 3, "steps": 1})
    clean = torch.randn(8, device="meta")
    stats.add(
        clean,
        torch.arange(6, device="meta"),
        torch.arange(6, 8, device="meta"),
        by_density=torch.zeros(8, dtype=torch.bool, device="meta"),
    )
    assert stats.totals.device.type == "meta" and (stats.blocked, stats.steps) == (5, 2)


def test_a_resume_drops_the_unreadable_names_of_epochs_it_redoes(tmp_path):
    from pfb_train.run_dir import UNREADABLE_FILE, rewrite_metrics

    from pfb_train.run_dir import RunLogger

    (tmp_path / UNREADABLE_FILE).write_text("0\ta.jpg\n1\tb.jpg\n")
    RunLogger(tmp_path).log_unreadable(2, ["c\n.jpg"])  # a line break in a file name stays one line
    rewrite_metrics(tmp_path, [{"epoch": 0}, {"epoch": 1}])  # the checkpoint holds two epochs
    assert (tmp_path / UNREADABLE_FILE).read_text() == "0\ta.jpg\n1\tb.jpg\n"
    RunLogger(tmp_path).log_unreadable(2, ["c\n.jpg"])
    assert (tmp_path / UNREADABLE_FILE).read_text().splitlines()[-1] == "2\tc\\n.jpg"


@pytest.mark.parametrize(
    "dropped, named",
    [
        (("partial", "step_costs"), "the interrupted epoch's compute"),
        (("selector", "per_rank"), "every rank's selection state"),
    ],
)
def test_a_checkpoint_of_an_earlier_version_is_one_line_naming_what_it_lacks(tmp_path, dropped, named):
    first = setup(load_config(None, [*TINY, f"runtime.output={tmp_path}", "runtime.checkpoint_every=4"]), DistInfo())
    fit(first, until_step=10)  # inside epoch 1
    path = first.run_dir / "checkpoint-last.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[dropped[0]][dropped[1]]  # as an earlier version wrote it
    save_atomic(checkpoint, path)
    with pytest.raises(UserError, match=f"written by an earlier version of pfb-train \\({named} missing\\)"):
        run(load_config(None, [*TINY, f"runtime.output={tmp_path}", "runtime.resume=auto"]))
