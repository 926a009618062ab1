"""Resume under changed settings, finished-run relaunches, values for timm checked first, options of
methods not chosen, seeds that give unrelated data orders."""

import math

import pytest

from pfb_train.data.loaders import ShardStreamSampler, TrainSampler
from pfb_train.data.wds import shard_stream


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


# ---------------------------------------------------------------- 1. resume under changed settings

from pfb_train import cli  # noqa: E402
from pfb_train.config import load_config  # noqa: E402
from pfb_train.distributed import DistInfo  # noqa: E402
from pfb_train.run_dir import read_metrics  # noqa: E402
from pfb_train.train import fit, run, setup  # noqa: E402

COSINE = [
    "model.name=test_resnet",
    "data.dataset=synthetic",
    "data.img_size=16",
    "data.train_samples=256",
    "data.val_samples=32",
    "data.batch_size=32",
    "data.workers=0",
    "optim.name=sgd",
    "optim.lr=0.1",
    "schedule.name=cosine",
    "schedule.epochs=4",
    "schedule.warmup_epochs=0",
    "runtime.progress=false",
    "runtime.device=cpu",
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


# ---------------------------------------------------------------- 2. a finished run is left as it is


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


# ---------------------------------------------------------------- 4. values for timm, checked first

from pfb_train.errors import UserError  # noqa: E402


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.name=plateau", "'plateau' steps once per epoch"),
        ("schedule.name=cosin", "did you mean 'cosine'"),
        ("optim.name=sgdd", "unknown timm optimizer 'sgdd' (did you mean 'sgd'"),
        ("data.auto_augment=randm9", "'randm9' is not a timm augmentation policy"),
        (
            "blocking.ratio=1.5",
            "config key 'blocking.ratio' is a flat key of an earlier version: each method's options now live in its "
            "own section (blocking.pfb.ratio, blocking.random.ratio, blocking.infobatch.prune_ratio, "
            "blocking.static_random.drop_fraction)",
        ),
        (
            "blocking.pfb.ratio=1.5",
            "'blocking.pfb.ratio' must be in [0, 1), got 1.5 (method 'pfb' reads it; blocking.method is 'none')",
        ),
        ("blocking.infobatch.delta=2", "'blocking.infobatch.delta' must be in (0, 1]"),
    ],
)
def test_values_no_part_of_the_run_can_take_are_one_line_before_any_work(override, message):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_optimizer_timm_lists_but_cannot_make_here_is_one_line(tmp_path):
    cfg = load_config(
        None,
        [
            "model.name=test_resnet",
            "data.img_size=16",
            "data.train_samples=32",
            "data.val_samples=16",
            "data.batch_size=16",
            "runtime.device=cpu",
            "runtime.progress=false",
            "optim.name=bnbadam",
            f"runtime.output={tmp_path}",
        ],
    )
    with pytest.raises(UserError, match=r"config key 'optim.name': timm cannot make optimizer 'bnbadam' here"):
        run(cfg)
    assert not any(tmp_path.iterdir())  # before the run directory


def test_a_fixed_size_model_is_built_at_the_configured_size_or_refused_before_the_run_directory(tmp_path):
    tiny = [
        "model.name=vit_tiny_patch16_224",
        "data.dataset=synthetic",
        "data.train_samples=32",
        "data.val_samples=16",
        "data.batch_size=16",
        "data.workers=0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "runtime.progress=false",
        "runtime.device=cpu",
        f"runtime.output={tmp_path}",
    ]
    summary = run(load_config(None, [*tiny, "data.img_size=32", "name=vit32"]))  # timm's default is 224 px
    assert summary["epochs"] == 1 and math.isfinite(summary["top1"])
    with pytest.raises(UserError, match=r"does not run on data.img_size 8 px .*its default is 224"):
        run(load_config(None, [*tiny, "data.img_size=8", "name=vit8"]))
    assert not (tmp_path / "vit8").exists()
