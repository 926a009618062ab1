"""Non-finite losses: steps skipped and counted, the streak that stops a run (across epochs and a resume),
and the epoch check where the per-step guard is off."""

import pytest
import torch

from pfb_train.checkpoint import latest_checkpoint
from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.run_dir import read_metrics
from pfb_train.train import fit, setup
from helpers import TINY_PFB


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
                *TINY_PFB,
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
    state = setup(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.max_nonfinite=3"]), DistInfo())
    poison(state, slice(None))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        fit(state)


def test_the_nonfinite_streak_counts_across_epochs_and_a_resume(tmp_path, capsys):
    """Every step non-finite, 6 per epoch, runtime.max_nonfinite 8: the run stops 2 steps into epoch 1, also
    when resumed between the epochs; the epoch whose every step was skipped reports no loss (not 0.0)."""
    config = [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.max_nonfinite=8", "data.mixup=0.0"]
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
        load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}", "runtime.check_finite=false", "data.mixup=0.0"]),
        DistInfo(),
    )
    assert state.settings.step_settings.check_finite is False
    poison(state, [0])
    with pytest.raises(RuntimeError, match="training loss of epoch 0 is not finite"):
        fit(state)
    assert not (state.run_dir / "metrics.jsonl").exists()  # the epoch was not logged as if it had trained


def test_check_finite_default_is_on_for_the_cpu(tmp_path):
    state = setup(load_config(None, [*TINY_PFB, f"runtime.output={tmp_path}"]), DistInfo())
    assert state.cfg.runtime.check_finite is None and state.settings.step_settings.check_finite is True
