"""Gradient accumulation (optim.accum_steps): micro-batches of data.batch_size, one optimizer step per
accum_steps of them, rows blocked in each micro-batch and the loss normalised over the step's kept rows."""

import pytest
import timm
import torch

from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
from pfb_train.models import split_model
from pfb_train.selection import Selector
from pfb_train.train import fit, run, setup
from helpers import TINY_PFB, assert_same_training_state, final_state, run_main


class KeepEvenRows(Selector):
    """Blocks the odd rows of every batch: with micro-batches of an even size, the same rows either way."""

    def blocks_rows(self):
        return True

    def select(self, feats, labels=None):
        return torch.arange(0, feats.shape[0], 2, device=feats.device)


def trained_weights(selector: Selector, accum_steps: int, steps: int = 3) -> dict:
    """A BatchNorm-free split ViT after `steps` optimizer steps of 32 rows, in `accum_steps` micro-batches."""
    torch.manual_seed(0)
    model = split_model(timm.create_model("test_vit", num_classes=4, img_size=32), stage=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = StepSettings(torch.device("cpu"), accum_steps=accum_steps, clip_grad=1.0, check_finite=True)
    context = StepContext(
        model, selector, settings, Optimization(optimizer, None, torch.amp.GradScaler("cpu", enabled=False))
    )
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = Batch(
            torch.randn(32, 3, 32, 32, generator=data), torch.randint(0, 4, (32,), generator=data), torch.arange(32)
        )
        result = train_step(batch, context, schedule_at=None)
        assert result.finite and result.labels.shape == (32,)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("selector", [Selector, KeepEvenRows], ids=["none", "fixed_blocked_rows"])
def test_two_micro_batches_of_16_train_as_one_batch_of_32(selector):
    whole, accumulated = trained_weights(selector(), 1), trained_weights(selector(), 2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_step_counts_every_micro_batch_and_offsets_their_kept_rows():
    model = split_model(timm.create_model("test_vit", num_classes=4, img_size=32), stage=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    context = StepContext(
        model,
        KeepEvenRows(),
        StepSettings(torch.device("cpu"), accum_steps=4),
        Optimization(optimizer, None, torch.amp.GradScaler("cpu", enabled=False)),
    )
    labels = torch.arange(16) % 4
    result = train_step(Batch(torch.randn(16, 3, 32, 32), labels, torch.arange(16)), context, schedule_at=None)
    assert result.kept == 8 and torch.equal(result.keep, torch.arange(0, 16, 2)) and torch.equal(result.labels, labels)


def test_an_accumulated_run_resumes_exactly_inside_an_epoch_and_info_shows_the_global_batch(tmp_path, capsys):
    accumulated = [*TINY_PFB, "data.batch_size=8", "optim.accum_steps=2"]  # 16 rows per optimizer step, as TINY_PFB
    whole = run(load_config(None, [*accumulated, f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*accumulated, f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_step=6 + 2)  # 6 optimizer steps per epoch: 2 into epoch 1
    resumed = run(load_config(None, [*accumulated, f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
    assert_same_training_state(final_state(whole["run_dir"]), final_state(resumed["run_dir"]))
    assert final_state(whole["run_dir"])["step"] == 4 * 6  # optimizer steps, not micro-batches
    assert resumed["top1"] == whole["top1"]
    result = run_main(capsys, "info", "--config", "demo", "--set", "optim.accum_steps=2")
    assert "global batch     64 x 2 micro-batches (128) per process x processes" in result.stdout
    odd = ["--set", "data.mixup=0.2", "--set", "data.batch_size=33"]  # Mixup pairs rows of the whole step's batch
    assert run_main(capsys, "info", "--config", "demo", *odd, "--set", "optim.accum_steps=2").returncode == 0
    result = run_main(capsys, "info", "--config", "demo", *odd, "--set", "optim.accum_steps=3")
    assert result.returncode == 2 and "need an even 'data.batch_size' x optim.accum_steps 3, got 99" in result.stderr
