"""The public API in a loop of one's own: examples/own_loop.py runs, blocks the right count and trains."""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import pfb_train

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_loop", ROOT / "examples" / "own_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_blocks_the_configured_count_and_trains(capsys):
    result = load_example().main(["--epochs", "3", "--ratio", "0.25"])
    assert result["kept_fraction"] == pytest.approx(24 / 32)  # round(0.25 * 32) = 8 of 32 rows blocked each step
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns
    assert result["blocking"].selector.counts.sum() > 0  # the density model observed the kept rows


@pytest.mark.distributed
def test_example_under_two_ddp_processes():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "own_loop.py"),
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("kept 0.625") == 2  # both ranks: 10 of 16 rows kept (round(0.4 * 16) = 6 blocked)


def test_the_api_equals_the_harness_step():
    """`Blocking.forward/loss/observe` is what `engine.train_step` runs: same model, same result."""
    from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step

    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=4)
    x, y, indices = torch.randn(12, 3, 32, 32), torch.arange(12) % 4, torch.arange(12)
    states = []
    for use_engine in (False, True):
        model = timm.create_model("resnet18", num_classes=4)
        model.load_state_dict(base.state_dict())
        blocking = pfb_train.Blocking(model, "pfb", ratio=0.25, centres=4, feature_dim=8, mode="recompute", seed=1)
        optimizer = torch.optim.SGD(blocking.model.parameters(), lr=0.1)
        for step in range(3):
            if use_engine:
                context = StepContext(
                    blocking.model,
                    blocking.selector,
                    StepSettings(torch.device("cpu"), check_finite=False),
                    Optimization(optimizer, None, torch.amp.GradScaler("cpu", enabled=False)),
                )
                train_step(Batch(x, y, indices), context, schedule_at=step + 1)
            else:
                batch = blocking.forward(blocking.model, x, y, indices)
                losses = F.cross_entropy(batch.logits.float(), batch.targets, reduction="none")
                optimizer.zero_grad(set_to_none=True)
                blocking.loss(batch, losses).backward()
                optimizer.step()
                blocking.observe(batch, losses)
        states.append((blocking.model.state_dict(), blocking.state_dict()))
    (model_a, sel_a), (model_b, sel_b) = states
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert torch.equal(sel_a["centres"], sel_b["centres"]) and torch.equal(sel_a["counts"], sel_b["counts"])


def test_api_checks_options_as_the_config_does():
    model = timm.create_model("resnet18", num_classes=4)
    with pytest.raises(pfb_train.UserError, match="'blocking.pfb.centres' must be >= 2"):
        pfb_train.Blocking(model, "pfb", centres=1)
    with pytest.raises(pfb_train.UserError, match="is not an option of method 'random'"):
        pfb_train.Blocking(model, "random", centres=8)
    assert pfb_train.Blocking(model, "pfb", ratio=0.5).model.mode == "recompute"  # auto: ratio > q^2 / 3
    assert pfb_train.Blocking(timm.create_model("resnet18"), "pfb", ratio=0.2, score_scale=1.0).model.mode == "reuse"
    assert pfb_train.Blocking(timm.create_model("resnet18"), "pfb", ratio=0.2).model.mode == "recompute"  # q = 0.5
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=4)  # takes 224 px only: q = 1
    assert pfb_train.Blocking(swin, "pfb", ratio=0.2).model.mode == "reuse"


def test_api_under_autocast_keeps_the_density_in_float32():
    torch.manual_seed(0)
    blocking = pfb_train.Blocking(
        timm.create_model("resnet18", num_classes=4), "pfb", ratio=0.25, centres=4, feature_dim=8
    )
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = blocking.forward(blocking.model, x, y)
    assert batch.logits.dtype == torch.bfloat16 and batch.logits.shape[0] == 6
    losses = F.cross_entropy(batch.logits.float(), batch.targets, reduction="none")
    blocking.loss(batch, losses).backward()
    blocking.observe(batch, losses)
    assert batch.feats.dtype == torch.float32 and blocking.selector.centres.dtype == torch.float32
    assert torch.isfinite(blocking.selector.centres).all()


def test_weighted_mean_leaves_stand_ins_out_of_a_batch_made_by_hand():
    """A BlockedBatch built without the masks blocking.forward carries: the mean is still over the rows that
    hold a sample (a negative index is an unreadable file's stand-in)."""
    losses = torch.tensor([1.0, 2.0, 6.0])
    batch = pfb_train.BlockedBatch(
        torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([4, 7, -1]), None, None
    )
    from pfb_train.blocking import weighted_mean

    assert weighted_mean(pfb_train.build_selector("none"), batch, losses).item() == pytest.approx(1.5)
