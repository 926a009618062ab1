"""Resuming a run: exact continuation from epoch and step checkpoints, each rank's own state, under
changed settings (batch size, world size, schedule), and a finished run left as it is."""

import math

import pytest
import torch

from pfb_train import cli
from pfb_train.checkpoint import latest_checkpoint, save_atomic
from pfb_train.config import load_config
from pfb_train.data.loaders import TrainSampler
from pfb_train.distributed import DistInfo
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.train import fit, run, setup
from helpers import SMALL_CPU_RUN, TINY_PFB, assert_same_training_state, final_state


def test_resume_after_epoch_two_is_exact(tmp_path):
    whole = run(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}/a"]))

    first = setup(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_epoch=2)  # stops after epoch index 1, as a preempted job would
    assert final_state(first.run_dir)["epoch"] == 2
    resumed = run(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))

    assert resumed["run_dir"] == str(first.run_dir)  # same run directory, continued
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))
    records = read_metrics(resumed["run_dir"])
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert resumed["top1"] == whole["top1"] and resumed["blocked_fraction"] == whole["blocked_fraction"]


def test_resume_mid_epoch_from_step_checkpoint_is_exact(tmp_path):
    steps = ["runtime.checkpoint_every=4"]  # 6 steps per epoch: a checkpoint inside every epoch
    whole = run(load_config(None, [*TINY_PFB, *steps, f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*TINY_PFB, *steps, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_step=10)  # epoch 1, batch 4 of 6
    saved = final_state(first.run_dir)
    assert (saved["epoch"], saved["step"]) == (1, 10)
    resumed = run(load_config(None, [*TINY_PFB, *steps, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
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
    first = setup(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_epoch=2)
    last = first.run_dir / "checkpoint-last.pt"
    assert (first.run_dir / "checkpoint-prev.pt").is_file()
    last.write_bytes(last.read_bytes()[:1000])  # torn file, as a full disk would leave
    path, state = latest_checkpoint(first.run_dir)
    assert path.name == "checkpoint-prev.pt" and state["epoch"] == 1
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    resumed = run(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.resume=auto"]))
    assert [r["epoch"] for r in read_metrics(resumed["run_dir"])] == [0, 1, 2, 3]  # epoch 1 redone once


def test_resume_auto_without_checkpoint_starts_fresh_but_an_explicit_path_must_exist(tmp_path):
    summary = run(
        load_config(
            None,
            [
                *TINY_PFB,
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
        run(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", f"runtime.resume={tmp_path}/nothing.pt"]))


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
    from pfb_train.run_dir import UNREADABLE_FILE, RunLogger, rewrite_metrics

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
    first = setup(
        load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.checkpoint_every=4"]), DistInfo()
    )
    fit(first, until_step=10)  # inside epoch 1
    path = first.run_dir / "checkpoint-last.pt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[dropped[0]][dropped[1]]  # as an earlier version wrote it
    save_atomic(checkpoint, path)
    with pytest.raises(UserError, match=f"written by an earlier version of pfb-train \\({named} missing\\)"):
        run(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.resume=auto"]))


COSINE = [
    *SMALL_CPU_RUN,
    "model.name=test_resnet",
    "data.img_size=16",
    "data.train_samples=256",
    "data.val_samples=32",
    "data.batch_size=32",
    "optim.name=sgd",
    "optim.lr=0.1",
    "schedule.name=cosine",
    "schedule.epochs=4",
    "schedule.warmup_epochs=0",
    "blocking.method=pfb",
    "blocking.pfb.ratio=0.25",
    "blocking.pfb.centres=4",
    "name=cos",
]


def cosine_lr(epoch_end: float, epochs: int = 4, base: float = 0.1) -> float:
    """timm's cosine schedule without warm-up or restarts, at the end of epoch `epoch_end` (by hand)."""
    return 0.5 * base * (1 + math.cos(math.pi * min(epoch_end, epochs) / epochs))


def test_resume_with_another_batch_size_follows_the_configured_schedule_and_counts_samples(tmp_path):
    """Stopped inside epoch 1 at batch 32, resumed at batch 16: the restored scheduler used to keep the
    old updates per epoch (lr 0.0 from epoch 1 on) and the position counted in batches (samples_seen
    above the set's size, a negative blocked fraction)."""
    first = setup(load_config(None, [*COSINE, f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_step=8 + 3)  # 8 steps per epoch: 3 steps (96 samples) into epoch 1
    resumed = run(
        load_config(None, [*COSINE, f"runtime.output={tmp_path}", "runtime.resume=auto", "data.batch_size=16"])
    )
    records = read_metrics(resumed["run_dir"])
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["lr"] == pytest.approx(cosine_lr(r["epoch"] + 1), abs=1e-9), r["epoch"]
        assert r["samples_seen"] == 256 and r["blocked_fraction"] == pytest.approx(0.25)
    assert resumed["blocked_fraction"] == pytest.approx(0.25)


def test_a_checkpoint_from_an_epochs_last_step_resumes_into_an_empty_rest(tmp_path):
    """Killed between the last step's checkpoint and the epoch-end one: nothing is left of the epoch."""
    first = setup(load_config(None, [*COSINE, "schedule.epochs=1", f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_step=8)  # 8 steps per epoch: the checkpoint holds the whole epoch as done
    resumed = run(
        load_config(None, [*COSINE, "schedule.epochs=1", f"runtime.output={tmp_path}", "runtime.resume=auto"])
    )
    record = read_metrics(resumed["run_dir"])[0]
    assert record["samples_seen"] == 256 and record["blocked_fraction"] == pytest.approx(0.25)


def test_a_global_skip_continues_the_epochs_order_under_another_world_size():
    """Two ranks took two steps of 4 (16 samples); one process then takes the rest, each sample once."""
    done = []
    for rank in range(2):
        sampler = TrainSampler(64, rank=rank, world_size=2, seed=3)
        sampler.set_epoch(5)
        done += [index for index, _ in sampler][:8]
    rest = TrainSampler(64, seed=3)
    rest.set_epoch(5, skip=16)
    later = [index for index, _ in rest]
    assert len(later) == len(rest) == 48
    assert sorted(done + later) == list(range(64))
    whole = TrainSampler(64, seed=3)
    whole.set_epoch(5)
    assert later == [index for index, _ in whole][16:]  # the same order, from where it stopped


def test_another_world_size_takes_every_saved_ranks_tally_once():
    """The epoch's totals are sums over ranks: resumed on another world size, rank 0 holds them all."""
    from pfb_train.engine import EpochTally
    from pfb_train.resume import rank_tally

    saved = []
    for rank in range(2):
        tally = EpochTally("cpu", 3)
        tally.batches, tally.rows_seen, tally.rows_kept, tally.elapsed = 5, 20, 15, 1.0 + rank
        tally.loss_sum += 2.0 * (rank + 1)
        tally.class_rows[0, rank] = 20.0
        saved.append(tally.state_dict())
    partial = {"order_done": 40, "ranks": saved}
    assert rank_tally(partial, DistInfo(rank=1, world_size=2)) == saved[1]  # same world size: its own
    merged = EpochTally("cpu", 3, rank_tally(partial, DistInfo(rank=0, world_size=1)), order_done=40)
    assert (merged.rows_seen, merged.rows_kept, merged.batches, merged.elapsed) == (40, 30, 5, 2.0)
    assert merged.loss_sum.item() == 6.0 and merged.class_rows[0].tolist() == [20.0, 20.0, 0.0]
    assert merged.order_done(more_rows=8) == 48  # the position goes on from the saved one, in samples
    assert rank_tally(partial, DistInfo(rank=1, world_size=3)) is None  # other ranks start from zero


def cli_args(config, *overrides) -> list:
    return [*(["--config", str(config)] if config else []), *(a for o in overrides for a in ("--set", o))]


def test_relaunching_a_finished_run_trains_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = cli_args(tmp_path / "empty.yaml", *COSINE, "schedule.epochs=1", f"runtime.output={tmp_path}")
    assert cli.main(args) == 0
    assert "test_resnet on synthetic (256 training samples)" in capsys.readouterr().out  # the run line names the data
    run_dir = tmp_path / "cos"
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    assert cli.main([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr()
    assert "is finished (1 epoch, top-1" in out.out and "schedule.epochs=" in out.out and "epoch 0:" not in out.out

    changed = [*args, *cli_args(None, "optim.lr=0.01", "data.train_samples=128"), "--resume", "auto"]
    assert cli.main(changed) == 2
    err = capsys.readouterr().err
    assert (
        "finished its 1 epoch, top-1" in err
        and "optim.lr 0.1 -> 0.01" in err
        and "data.train_samples 256 -> 128" in err
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files  # nothing rewritten


def test_a_resume_keeps_its_blocking_mode_and_refuses_the_other_one(tmp_path, capsys):
    """The mode is decided once: a resumed run goes on in its checkpoint's (auto does not time again), and a
    config that sets the other mode is one line before any step."""
    first = setup(load_config(None, [*TINY_PFB, "blocking.mode=recompute", f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_epoch=1)
    resumed = setup(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.resume=auto"]), DistInfo())
    assert resumed.net.mode == "recompute" and resumed.mode_reason == "as in the checkpoint"
    assert "(mode recompute: as in the checkpoint" in capsys.readouterr().out
    with pytest.raises(UserError, match="trained with blocking.mode 'recompute', this config sets 'reuse'"):
        setup(
            load_config(None, [*TINY_PFB, "blocking.mode=reuse", f"runtime.output={tmp_path}", "runtime.resume=auto"]),
            DistInfo(),
        )
