"""What a run reports about its selection: per-class kept fractions, the selection signal, the
unweighted training loss and per-class validation accuracy."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from pfb_train.config import load_config
from pfb_train.engine import EpochTally, Optimization, StepContext, StepSettings, evaluate
from pfb_train.run_dir import read_metrics
from pfb_train.models import split_model
from pfb_train.selection import build_selector
from pfb_train.selection.base import Selector
from pfb_train.train import run
from helpers import train_epoch


class KeepFirstRows(Selector):
    """Blocks every row but the first `k` of each batch: a selection whose outcome is known."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def blocks_rows(self):
        return True

    def select(self, feats, labels=None):
        return torch.arange(self.k)


def _context(model, selector, mixup=None) -> StepContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return StepContext(
        model,
        selector,
        StepSettings(torch.device("cpu"), label_smoothing=0.1, check_finite=False),
        Optimization(optimizer, None, torch.amp.GradScaler("cpu", enabled=False), mixup=mixup),
    )


def test_kept_fraction_per_class_counts_the_kept_rows_of_each_class():
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=5), stage=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # rows 0-5 kept: classes 0,1 keep 2 of 3, 2,3 keep 1 of 2
    batches = [(torch.randn(10, 3, 32, 32), labels, torch.arange(10) + 10 * i) for i in range(2)]
    stats = train_epoch(_context(model, KeepFirstRows(6)), batches, 0, EpochTally("cpu", 5))
    assert stats["class_kept_fraction"] == [0.6667, 0.6667, 0.5, 0.5, None]  # class 4: no rows
    assert "selection_signal" not in stats  # the method has no density to compare with


def test_mixed_rows_count_for_their_dominant_label():
    model = split_model(timm.create_model("resnet18", num_classes=3), stage=1)

    def mix(x, y):  # what timm's Mixup returns: soft targets; row i is mostly class 2 - y[i]
        soft = 0.3 * F.one_hot(y, 3).float() + 0.7 * F.one_hot(2 - y, 3).float()
        return x, soft

    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 0, 1]), torch.arange(4))
    stats = train_epoch(_context(model, KeepFirstRows(2), mixup=mix), [batch], 0, EpochTally("cpu", 3))
    assert stats["class_kept_fraction"] == [None, 0.0, round(2 / 3, 4)]  # dominant labels: 2, 2, 2, 1


def test_train_loss_is_unweighted_when_the_method_weights_rows():
    """InfoBatch multiplies kept candidates' losses by 1/(1-r); train_loss stays the plain mean, so it
    compares across methods."""
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=4), stage=1)
    x, y, indices = torch.randn(8, 3, 32, 32), torch.arange(8) % 4, torch.arange(8)
    selector = build_selector("infobatch", prune_ratio=0.5, epochs=4)
    selector.scores = torch.tensor([0.0] * 4 + [9.0] * 4)  # rows 0-3 below the mean: candidates
    selector.set_epoch(1)
    selector.epoch_indices(8)
    weights = selector.loss_weights(indices)
    assert weights.max() == 2.0  # some kept candidate is weighted
    before = copy.deepcopy(model)
    with torch.no_grad():
        expected = F.cross_entropy(before(x).logits, y, label_smoothing=0.1).item()
    stats = train_epoch(_context(model, selector), [(x, y, indices)], 1, EpochTally("cpu", 4))
    assert stats["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_reports_top1_per_class():
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=3), stage=1)
    settings = _context(model, selector=None).settings
    x, y = torch.randn(12, 3, 32, 32), torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    indices = torch.arange(12)
    result = evaluate(model, [(x[:7], y[:7], indices[:7]), (x[7:], y[7:], indices[7:])], settings)
    model.eval()
    with torch.no_grad():
        hits = model(x).logits.argmax(1).eq(y).float()
    expected = [round(100 * hits[y == c].mean().item(), 4) for c in range(3)]
    assert result["val_class_top1"] == expected
    assert result["top1"] == pytest.approx(100 * hits.mean().item())


def test_demo_on_synthetic_data_logs_a_signal_every_epoch(tmp_path):
    """The issue's check, shortened: every epoch of a pfb run blocking from epoch 0 has a numeric
    selection_signal in [0, 1], density percentiles and a kept fraction per class."""
    cfg = load_config(
        "demo",
        [
            "data.dataset=synthetic",
            "blocking.pfb.start_epoch=0",
            "blocking.random.start_epoch=0",
            "schedule.epochs=2",
            "data.train_samples=256",
            "data.val_samples=100",
            f"runtime.output={tmp_path}",
            "runtime.progress=false",
        ],
    )
    records = read_metrics(run(cfg)["run_dir"])
    assert len(records) == 2
    for r in records:
        assert 0.0 <= r["selection_signal"] <= 1.0
        assert 0.0 <= r["kept_density_q50"] <= 1.0 and r["blocked_density_q50"] > r["kept_density_q50"]
        fractions = r["class_kept_fraction"]
        assert len(fractions) == 10 and all(0.0 <= f <= 1.0 for f in fractions)
        assert len(r["val_class_top1"]) == 10
