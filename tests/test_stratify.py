"""Stratified selection (blocking.pfb.stratify), class-conditional density (blocking.pfb.density) and the
warning for classes a selection starves."""

import collections
import math
from dataclasses import dataclass

import pytest
import torch

from pfb_train import blocking
from pfb_train.config import load_config
from pfb_train.errors import UserError
from pfb_train.records import starvation_warning, starved_classes
from pfb_train.selection import Method, Selector, build_selector, register, unregister
from pfb_train.selection.base import BlockingSchedule
from pfb_train.selection.pfb import PFBSelector, kde_log_density, reduce_features
from pfb_train.selection.stratify import block_within_classes, class_quotas, class_rank, kept_rows
from pfb_train.train import fit, setup
from pfb_train.distributed import DistInfo


def test_quotas_split_the_blocked_rows_by_largest_remainder():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = int(torch.randint(2, 70, (1,), generator=g))
        labels = torch.randint(0, int(torch.randint(1, 12, (1,), generator=g)), (rows,), generator=g)
        blocked = int(torch.randint(0, rows, (1,), generator=g))
        quotas = class_quotas(labels, blocked, g)
        total = 0
        for c, n in collections.Counter(labels.tolist()).items():
            q = quotas[labels == c]
            assert (q == q[0]).all()  # one quota per class
            exact, q = blocked * n / rows, int(q[0])
            assert math.floor(exact) <= q <= math.ceil(exact) and q <= n
            total += q
        assert total == blocked  # the batch keeps exactly rows - blocked on every rank


def test_equal_remainders_are_not_always_given_to_the_same_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # 3 blocked: each class's share is 1.5
    g = torch.Generator().manual_seed(0)
    first_class_quota = [int(class_quotas(labels, 3, g)[0]) for _ in range(200)]
    assert set(first_class_quota) == {1, 2}
    assert 60 < first_class_quota.count(2) < 140


def test_rows_are_blocked_by_score_inside_their_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2])
    scores = torch.tensor([5.0, 1.0, 3.0, 9.0, 4.0, 2.0, 7.0])
    quotas = torch.tensor([2, 1, 2, 1, 2, 1, 0])
    blocked = block_within_classes(scores, labels, quotas)
    assert blocked.tolist() == [True, False, False, True, True, False, False]
    assert kept_rows(blocked, 4).tolist() == [1, 2, 5, 6]
    assert class_rank(scores, labels).tolist() == [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0]


def _clustered(rows_per_class=(24, 24), seed=0):
    """Class 0 packed tightly (every row common), class 1 spread wide (every row rare): (rows, 16) features."""
    g = torch.Generator().manual_seed(seed)
    tight = 0.05 * torch.randn(rows_per_class[0], 16, generator=g)
    wide = 3.0 * torch.randn(rows_per_class[1], 16, generator=g)
    labels = torch.tensor([0] * rows_per_class[0] + [1] * rows_per_class[1])
    return torch.cat([tight, wide]), labels


def _pfb(**options) -> PFBSelector:
    return PFBSelector(BlockingSchedule(0.5), centres=8, feature_dim=16, noise=0.0, num_classes=2, **options)


def test_density_over_the_batch_starves_a_class_and_stratifying_keeps_its_share():
    feats, labels = _clustered()
    plain = _pfb().select(feats, labels)
    stratified_selector = _pfb(stratify="label")
    stratified = stratified_selector.select(feats, labels)
    assert (labels[plain] == 0).sum() == 0  # the tight class is all blocked
    assert (labels[stratified] == 0).sum() == 12 and (labels[stratified] == 1).sum() == 12
    # within each class the densest rows went: at noise 0 the density alone decided
    density = stratified_selector.density(reduce_features(feats, 16))
    for c in (0, 1):
        rows = (labels == c).nonzero().flatten()
        blocked = set(rows.tolist()) - set(stratified.tolist())
        assert blocked == set(rows[density[rows].argsort(descending=True)[:12]].tolist())
    assert stratified_selector.epoch_diagnostics("cpu")["selection_signal"] == 1.0


def test_stratified_noise_ranks_among_the_class_and_the_signal_falls_with_it():
    feats, labels = _clustered((64, 64))
    signals = []
    for level in (0.05, 2.0):
        selector = _pfb(stratify="label")
        selector.noise = level
        for _ in range(5):
            keep = selector.select(feats, labels)
            assert (labels[keep] == 0).sum() == 32  # the share holds whatever the noise
        signals.append(selector.epoch_diagnostics("cpu")["selection_signal"])
    assert signals[0] > 0.9 and signals[1] < 0.75


def test_class_density_weighs_the_shared_centres_by_the_row_class():
    selector = _pfb(density="class")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 2  # interleaved, so the first batch's centres sit in both clusters
    feats = 0.1 * torch.randn(48, 16, generator=g) + torch.where(labels == 0, 2.0, -2.0).unsqueeze(1)
    selector.observe(feats, None, None, None, labels)  # initialises the centres from the batch, then counts
    assert torch.equal(selector.class_counts.sum(0), selector.counts)
    assert selector.class_counts.sum() == len(labels)
    v = reduce_features(feats, 16)
    for c in (0, 1):
        expected = kde_log_density(v, selector.centres, selector.class_counts[c] / selector.class_counts[c].sum())
        got = selector.density(v, torch.full_like(labels, c))
        assert torch.allclose(got, expected)
    # A row is common under its own class's mixture and rare under the other's.
    row = v[:1]
    assert selector.density(row, torch.tensor([0])) > selector.density(row, torch.tensor([1])) + 10


def test_class_density_needs_labels_and_kde_counts():
    with pytest.raises(ValueError, match="needs the batch's labels"):
        selector = _pfb(density="class")
        feats, labels = _clustered()
        selector.select(feats)
    with pytest.raises(UserError, match="blocking.pfb.density' 'class' .* needs 'blocking.pfb.estimator' kde"):
        load_config(
            "demo", ["blocking.method=pfb", "blocking.pfb.density=class", "blocking.pfb.estimator=mean_log_kernel"]
        )
    with pytest.raises(UserError, match="blocking.pfb.stratify"):
        load_config("demo", ["blocking.pfb.stratify=class"])


def test_a_checkpoint_without_class_counts_is_refused_by_class_density():
    marginal = _pfb()
    feats, labels = _clustered()
    marginal.select(feats, labels)
    state = marginal.state_dict()
    assert state["class_counts"] is None  # a marginal density counts no classes
    with pytest.raises(UserError, match="trained with density 'marginal'"):
        _pfb(density="class").load_state_dict(state)


class Spy(Selector):
    """Blocks nothing, remembers the labels its hooks saw."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def blocks_rows(self):
        return True

    def select(self, feats, labels=None):
        self.seen["select"] = labels
        return torch.arange(feats.shape[0] - 1)

    def observe(self, feats, keep, indices, losses, labels=None):
        self.seen["observe"] = labels


def _tiny_model():
    import timm
    from pfb_train.models import split_model

    return split_model(timm.create_model("resnet18", num_classes=3), stage=1, mode="reuse")


def test_mixed_targets_are_selected_and_observed_by_their_dominant_class():
    model, spy = _tiny_model(), Spy()
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.6, 0.0, 0.4]])
    batch = blocking.forward(model, spy, torch.randn(4, 3, 32, 32), soft, torch.arange(4))
    blocking.observe(spy, batch, torch.zeros(3))
    assert spy.seen["select"].tolist() == [0, 2, 1, 0]
    assert spy.seen["observe"].tolist() == [0, 2, 1]  # the kept rows'


def test_starved_classes_are_those_under_half_the_mean_over_classes():
    assert starved_classes([0.6, 0.6, 0.1, None, 0.5]) == {"2": 0.1}  # mean 0.45 over the 4 classes with rows
    assert starved_classes([0.5, 0.5, 0.3]) == {}
    assert starved_classes([None, None]) == {}
    pfb = load_config("demo", ["blocking.method=pfb", "blocking.pfb.stratify=none"])
    line = starvation_warning(3, {"2": 0.1}, [0.6, 0.6, 0.1, None, 0.5], pfb)
    assert line.startswith("warning: epoch 3: class 2 kept 0.10 of its rows, under half the mean kept fraction 0.45")
    assert "blocking.pfb.stratify=percentile" in line
    stratified = load_config("demo", ["blocking.method=pfb", "blocking.pfb.stratify=label"])
    assert "stratify" not in starvation_warning(3, {"2": 0.1}, [0.6, 0.6, 0.1, None, 0.5], stratified)


def test_a_class_seen_a_few_times_is_not_called_starved_for_chance_and_the_line_stays_short():
    kept = [0.0] + [0.6] * 999  # 1000 classes: one kept none of its rows
    assert starved_classes(kept, [2] + [300] * 999) == {}  # 0 of 2: chance at a kept rate of 0.6
    assert starved_classes(kept, [300] * 1000) == {"0": 0.0}  # 0 of 300 is not
    many = {str(c): 0.0 for c in range(15)}
    line = starvation_warning(2, many, [0.0] * 15 + [0.6] * 985, load_config("demo", ["blocking.method=pfb"]))
    assert line.count("class ") == 10 and "5 more classes too" in line


@dataclass
class StarveOptions:
    ratio: float = 0.25

    def check(self, run, key):
        pass


class StarveFirstClass(Selector):
    """Blocks class 0's rows first: a class the warning must name."""

    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def blocks_rows(self):
        return self.epoch >= 1

    def select(self, feats, labels=None):
        kept = feats.shape[0] - round(self.ratio * feats.shape[0])
        return kept_rows(labels == 0, kept)


def test_a_run_that_starves_a_class_says_so_each_epoch_and_records_it(tmp_path, capsys):
    register(
        Method(
            "starve",
            level="batch",
            options=StarveOptions,
            build=lambda o, run: StarveFirstClass(o.ratio),
            ratio_option="ratio",
        )
    )
    try:
        cfg = load_config(
            None,
            [
                "model.name=test_resnet",
                "data.dataset=synthetic",
                "data.img_size=16",
                "data.batch_size=16",
                "data.train_samples=64",
                "data.val_samples=16",
                "data.workers=0",
                "model.num_classes=4",
                "schedule.epochs=3",
                "runtime.device=cpu",
                "runtime.progress=false",
                f"runtime.output={tmp_path}",
                "name=starve",
                "blocking.method=starve",
            ],
        )
        summary = fit(setup(cfg, DistInfo()))
    finally:
        unregister("starve")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: epoch")]
    assert [w.split(":")[1].strip() for w in warnings] == ["epoch 1", "epoch 2"]  # once per blocking epoch
    assert all(w.split(": ", 2)[2].startswith("class 0 kept 0.") for w in warnings)
    assert "stratify" not in out  # the hint is for a method that has the option
    assert [e["epoch"] for e in summary["starved_classes"]] == [1, 2]
    assert all(list(e["classes"]) == ["0"] for e in summary["starved_classes"])


@pytest.mark.parametrize(
    "estimator,noise_form",
    [("kde", "rank"), ("kde", "density_floor"), ("mean_log_kernel", "max_abs"), ("mean_log_kernel", "rank")],
)
def test_every_estimator_and_noise_form_keeps_each_class_share(estimator, noise_form):
    selector = build_selector(
        "pfb", ratio=0.25, centres=8, feature_dim=16, estimator=estimator, noise_form=noise_form, stratify="label"
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        labels = torch.tensor([0] * 20 + [1] * 8 + [2] * 4)  # shares of 8 blocked rows: 5, 2, 1
        keep = selector.select(torch.randn(32, 16, generator=g), labels)
        assert [int((labels[keep] == c).sum()) for c in range(3)] == [15, 6, 3]


def test_runs_written_before_the_option_read_as_unstratified(upgrade_run_logs):
    """A stored config without `stratify` was trained with one ranking over the batch: the one-off rewrite of
    stored run logs says so, and a resume compares it so."""
    from pfb_train.config import experiment_settings
    from pfb_train.resume import changed_settings

    now = load_config("demo", ["blocking.method=pfb"]).to_dict()
    earlier = {
        **now,
        "blocking": {
            **now["blocking"],
            "pfb": {k: v for k, v in now["blocking"]["pfb"].items() if k not in ("stratify", "density")},
        },
    }
    earlier = {**earlier, "blocking": upgrade_run_logs.upgrade_blocking(earlier["blocking"])}
    assert experiment_settings(earlier)["blocking"]["pfb"]["stratify"] == "none"
    assert experiment_settings(now)["blocking"]["pfb"]["stratify"] == "percentile"  # the default today
    assert changed_settings(earlier, now) == ["blocking.pfb.stratify 'none' -> 'percentile'"]
