"""The training step does no avoidable work: it never makes the host wait for the device, and
epochs without blocking run the shallow part once.

On a GPU, reading a value back (`.item()`, `bool(t)`) or running an op whose output shape
depends on the data (`nonzero`, boolean-mask indexing, `unique`, `bincount`) blocks the
CPU until the GPU catches up, so the next step's kernels stop being queued ahead. These
tests record every such op on the CPU with a dispatch mode, so they run without a GPU;
`tests/test_gpu.py` checks the same with CUDA's own sync detector when one is present.
"""

import pytest
import timm
import torch

from pfb_train.engine import Batch, EpochTally, Optimization, StepContext, StepSettings, train_step
from pfb_train.models import split_model
from pfb_train.selection.score_pass import AUTO_SCORE
from pfb_train.selection import build_selector
from helpers import HostReads, train_epoch


def test_detector_sees_the_reads_it_must():
    x = torch.randn(8)
    with HostReads() as reads:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        (x > 0).nonzero()
        x.tolist()
        x.topk(3).indices.sort()  # not a read: must not be recorded
        x.index_select(0, torch.tensor([1, 2]))
    assert reads.ops.count("aten::_local_scalar_dense") + reads.ops.count("aten::is_nonzero") >= 2
    assert "aten::nonzero" in reads.ops and "Tensor.tolist" in reads.ops
    assert any(op.startswith("aten::index") for op in reads.ops)
    assert len(reads.ops) <= 6


def _context(model, selector, check_finite: bool, clip_grad=None) -> StepContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    settings = StepSettings(torch.device("cpu"), label_smoothing=0.1, clip_grad=clip_grad, check_finite=check_finite)
    return StepContext(
        model, selector, settings, Optimization(optimizer, None, torch.amp.GradScaler("cpu", enabled=False))
    )


SELECTORS = {
    "none": lambda: build_selector("none"),
    "random": lambda: build_selector("random", ratio=0.4),
    "pfb-kde": lambda: build_selector("pfb", ratio=0.4, centres=8, feature_dim=16, num_classes=4),
    "pfb-mean_log_kernel": lambda: build_selector(
        "pfb", ratio=0.4, centres=8, feature_dim=16, num_classes=4, estimator="mean_log_kernel"
    ),
    "pfb-batch-ranking": lambda: build_selector("pfb", ratio=0.4, centres=8, feature_dim=16, stratify="none"),
    # class histories at 1000 classes: ranked in select while blocking, in observe before the window
    "pfb-class-history": lambda: build_selector(
        "pfb", ratio=0.4, centres=8, feature_dim=16, stratify="percentile", num_classes=1000
    ),
    "pfb-class-history-before-window": lambda: build_selector(
        "pfb", ratio=0.4, centres=8, feature_dim=16, stratify="percentile", num_classes=1000, start_epoch=1
    ),
}
BLOCKS_NOTHING = ("none", "pfb-class-history-before-window")


@pytest.mark.parametrize("mode", ["reuse", "recompute"])
@pytest.mark.parametrize("method", list(SELECTORS))
def test_training_step_reads_nothing_back(method, mode):
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1, mode=mode)
    selector = SELECTORS[method]()
    ctx = _context(model, selector, check_finite=False, clip_grad=1.0)
    batch = Batch(torch.randn(10, 3, 32, 32), torch.arange(10) % 4, torch.arange(10))
    with HostReads() as reads:
        for step in range(3):  # the first step also initialises the pfb centres
            kept = train_step(batch, ctx, schedule_at=step + 1).kept
    assert reads.ops == []
    assert kept == (10 if method in BLOCKS_NOTHING else 6)


def test_infobatch_step_reads_nothing_back():
    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1)
    selector = build_selector("infobatch", prune_ratio=0.5, epochs=4)
    selector.set_epoch(0)
    selector.epoch_indices(10)  # per epoch, off the hot path
    ctx = _context(model, selector, check_finite=False)
    batch = Batch(torch.randn(10, 3, 32, 32), torch.arange(10) % 4, torch.arange(10))
    with HostReads() as reads:
        train_step(batch, ctx, schedule_at=1)
    assert reads.ops == []


def test_finite_guard_is_the_one_read_per_step():
    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1)
    selector = build_selector("pfb", ratio=0.4, centres=8, feature_dim=16, num_classes=4)
    ctx = _context(model, selector, check_finite=True)
    batch = Batch(torch.randn(10, 3, 32, 32), torch.arange(10) % 4, torch.arange(10))
    with HostReads() as reads:
        for step in range(3):
            train_step(batch, ctx, schedule_at=step + 1)
    assert len(reads.ops) == 3


def test_epoch_reads_back_only_at_its_end():
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1)
    selector = build_selector("pfb", ratio=0.4, centres=8, feature_dim=16, num_classes=4)
    ctx = _context(model, selector, check_finite=False)
    batches = [(torch.randn(10, 3, 32, 32), torch.arange(10) % 4, torch.arange(10) + 10 * i) for i in range(6)]
    with HostReads() as reads:
        stats = train_epoch(ctx, batches, 0, EpochTally("cpu", 4))
    assert stats["samples_kept"] == 36
    assert len(reads.ops) <= 2  # the loss total and the counts, once


def test_epochs_without_blocking_run_the_shallow_part_once():
    """recompute mode runs the shallow part twice only while rows are blocked; before blocking
    starts pfb still sees the features (its centres follow the data) and blocks nothing."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=4)
    model = split_model(net, stage=1, mode="recompute")
    model.resolve_score(AUTO_SCORE, 32)  # the automatic ranking pass is decided once, by one image: not counted
    calls = []
    net.layer1.register_forward_hook(lambda *_: calls.append(1))
    selector = build_selector("pfb", ratio=0.4, start_epoch=1, end_epoch=2, centres=8, feature_dim=16, num_classes=4)
    ctx = _context(model, selector, check_finite=False)
    batch = Batch(torch.randn(10, 3, 32, 32), torch.arange(10) % 4, torch.arange(10))
    kept_per_epoch = []
    for epoch in range(3):
        selector.set_epoch(epoch)
        calls.clear()
        kept = train_step(batch, ctx, schedule_at=epoch + 1).kept
        kept_per_epoch.append((kept, len(calls)))
        if epoch == 0:
            assert selector.centres is not None and selector.counts.sum() == 10
    assert kept_per_epoch == [(10, 1), (6, 2), (10, 1)]
    assert selector.counts.sum() == 16  # epoch 1 observed its 6 kept rows; epoch 2 (after the end) nothing
