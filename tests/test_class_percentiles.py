"""Selection by class history (blocking.pfb.stratify: percentile): the per-class statistic, its merge over
ranks, and what it protects: classes that merely look alike keep their share, rare classes keep more."""

import math

import pytest
import torch

from pfb_train.errors import UserError
from pfb_train.records import starved_classes
from pfb_train.selection import build_selector
from pfb_train.selection.percentile import BINS, PRIOR_ROWS, ClassPercentiles


def _history(classes=2, memory=1e9) -> ClassPercentiles:
    return ClassPercentiles(classes, memory)


def test_a_class_seen_nowhere_ranks_by_its_batch_rank_alone():
    history = _history()
    ranks = torch.tensor([0.0, 0.25, 0.5, 1.0])
    score = history.score(ranks, torch.tensor([0, 1, 0, 1]), torch.Generator().manual_seed(0))
    assert torch.allclose(score, ranks.clamp_min(1e-6).log())  # share 1 (balanced), percentile = rank


def test_the_percentile_is_the_place_among_the_class_history():
    history = _history()
    # class 0 has always ranked in the top bin; class 1 across the whole range
    top = torch.full((100,), 0.99)
    spread = (torch.arange(100) + 0.5) / 100
    history.add(history.batch_counts(torch.cat([top, spread]), torch.tensor([0] * 100 + [1] * 100), torch.ones(200)))
    assert history.hist[0, BINS - 1] == 100 and history.hist[1].sum() == 100
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [history.score(torch.tensor([0.99, 0.99, 0.5]), torch.tensor([0, 1, 1]), g).exp() for _ in range(400)]
    )
    # class 0's usual rank is its median, drawn across its one bin: its percentile spreads evenly over
    # [low, high] (the prior's rows hold the rest), not 1 every time
    low, high = PRIOR_ROWS * 0.99 / (100 + PRIOR_ROWS), (100 + PRIOR_ROWS * 0.99) / (100 + PRIOR_ROWS)
    assert low - 1e-5 <= draws[:, 0].min() and draws[:, 0].max() <= high + 1e-5
    assert abs(draws[:, 0].mean() - 0.5) < 0.05 and abs(draws[:, 0].std() - (high - low) / 12**0.5) < 0.03
    # class 1: 0.99 is near its top, 0.5 near its middle, whatever the draw inside the bin
    assert draws[:, 1].min() > 0.95 and abs(draws[:, 2].mean() - 0.5) < 0.03


def test_a_class_rare_in_the_data_scores_lower_at_the_same_percentile():
    history = _history()
    ranks = torch.rand(1100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 1000 + [1] * 100)
    history.add(history.batch_counts(ranks, labels, torch.ones(1100)))
    # the same place in either class's history: the rare class's score is lower by log(101 / 1001)
    frequent = history.score(torch.tensor([0.5]), torch.tensor([0]), torch.Generator().manual_seed(1))
    rare = history.score(torch.tensor([0.5]), torch.tensor([1]), torch.Generator().manual_seed(1))
    share = lambda n: math.log(2 * (n + 1) / (1100 + 2))  # noqa: E731
    assert abs((frequent - rare).item() - (share(1000) - share(100))) < 0.15  # up to the two draws' percentiles


def test_the_history_decays_by_the_rows_it_takes_and_leaves_out_rows_of_weight_zero():
    history = ClassPercentiles(3, memory=4.0)  # about 4 rows per class: 12 in all
    counts = history.batch_counts(
        torch.tensor([0.1, 0.6, 0.6, 0.9]), torch.tensor([0, 2, 2, 1]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    )
    assert counts.sum() == 3 and counts[2, int(0.6 * BINS)] == 2 and counts[1].sum() == 0
    history.add(counts)
    history.add(counts)
    assert torch.allclose(history.hist, counts * (1 - 3 / 12) + counts)
    for _ in range(200):
        history.add(counts)
    assert abs(history.hist.sum().item() - 12) < 1e-3  # the steady state holds memory * C rows


def test_counts_summed_over_ranks_are_the_counts_of_the_whole_batch():
    """What the all-reduce does under DDP: each rank counts its rows, the sum is the one-process history."""
    g = torch.Generator().manual_seed(0)
    ranks, labels = torch.rand(64, generator=g), torch.randint(0, 5, (64,), generator=g)
    one, two = ClassPercentiles(5, 100.0), ClassPercentiles(5, 100.0)
    one.add(one.batch_counts(ranks, labels, torch.ones(64)))
    two.add(
        two.batch_counts(ranks[:32], labels[:32], torch.ones(32))
        + two.batch_counts(ranks[32:], labels[32:], torch.ones(32))
    )
    assert torch.equal(one.hist, two.hist)
    restored = ClassPercentiles(5, 100.0)
    restored.load_state_dict(one.state_dict())
    assert torch.equal(restored.hist, one.hist)


def test_the_histories_learn_from_every_row_before_and_during_blocking():
    selector = build_selector(
        "pfb",
        ratio=0.5,
        centres=4,
        feature_dim=8,
        stratify="percentile",
        num_classes=3,
        start_epoch=1,
        class_memory=1e6,
    )
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(16, 8, generator=g), torch.arange(16) % 3
    selector.observe(feats, None, torch.arange(16), None, labels)  # before the window: every row
    assert selector.class_percentiles.hist.sum(dim=1).tolist() == [6, 5, 5]
    selector.set_epoch(1)
    keep = selector.select(feats, labels)
    selector.observe(feats, keep, keep, None, labels[keep])  # blocking: the 8 blocked rows count too
    assert keep.shape[0] == 8 and torch.allclose(
        selector.class_percentiles.hist.sum(dim=1), torch.tensor([12.0, 10.0, 10.0]), atol=1e-3
    )
    with pytest.raises(ValueError, match="no select"):  # a blocked batch whose select never ran
        selector.observe(feats, keep, keep, None, labels[keep])


def test_percentile_needs_the_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_selector("pfb", ratio=0.4, stratify="percentile")
    with pytest.raises(ValueError, match="labels"):
        build_selector("pfb", ratio=0.4, centres=4, feature_dim=4, stratify="percentile", num_classes=3).select(
            torch.randn(8, 4)
        )
    with pytest.raises(UserError, match="noise_form"):  # the score is a percentile: a log-density's noise means nothing
        build_selector("pfb", ratio=0.4, stratify="percentile", noise_form="max_abs", num_classes=3)


def _stream(selector, steps, batch, classes, dense, gen, feats_dim=16):
    """Feed `steps` batches; each covers the classes in a fresh order (a class appears once in
    `classes / batch` steps). Dense classes' rows are tightly packed (the batch's most common rows),
    the rest spread. Returns per-class kept fractions of the blocking steps."""
    kept, seen = torch.zeros(classes), torch.zeros(classes)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(classes, generator=gen)])
        labels, order = order[:batch], order[batch:]
        is_dense = (labels < dense).unsqueeze(1)
        feats = torch.where(
            is_dense,
            0.05 * torch.randn(batch, feats_dim, generator=gen),
            3.0 * torch.randn(batch, feats_dim, generator=gen),
        )
        keep = selector.select(feats, labels) if selector.blocks_rows() else None
        mask = torch.ones(batch, dtype=torch.bool)
        if keep is not None:
            mask[:] = False
            mask[keep] = True
            kept += torch.zeros(classes).index_add_(0, labels, mask.float())
            seen += torch.zeros(classes).index_add_(0, labels, torch.ones(batch))
        rows = torch.arange(batch) if keep is None else keep
        selector.observe(feats, keep, rows, None, labels[rows])
    return (kept / seen.clamp_min(1)).tolist()


@pytest.mark.parametrize("stratify", ["percentile", "none"])
def test_a_class_present_once_per_epoch_is_never_starved(stratify):
    """1000 classes, 250 rows a step: every class shows one row per 4-step epoch. The first 100 classes
    always hold the batch's densest rows. Ranked over the batch (none) they are blocked every time;
    against their own history (percentile) they give up their share like every other class."""
    selector = build_selector(
        "pfb",
        ratio=0.4,
        centres=16,
        feature_dim=16,
        noise=0.0,
        stratify=stratify,
        num_classes=1000,
        start_epoch=1,
        update_rate=0.1,
    )
    gen = torch.Generator().manual_seed(0)
    selector.set_epoch(0)
    _stream(selector, 40, 250, 1000, 100, gen)  # ten epochs without blocking: the histories fill
    selector.set_epoch(1)
    kept = _stream(selector, 200, 250, 1000, 100, gen)  # fifty epochs of blocking: 50 rows of each class
    starved = starved_classes(kept)
    dense = sum(kept[:100]) / 100
    if stratify == "none":
        assert dense < 0.05 and len(starved) >= 100
    else:
        assert starved == {} and abs(dense - 0.6) < 0.1


def test_rare_classes_keep_more_of_their_rows_and_look_alike_classes_keep_their_share():
    """Ten classes: 0-4 look alike (dense), 5-9 do not; 8 and 9 are ten times rarer in the data."""
    selector = build_selector(
        "pfb", ratio=0.4, centres=16, feature_dim=16, stratify="percentile", num_classes=10, start_epoch=1
    )
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0] * 8 + [0.1] * 2)
    kept, seen = torch.zeros(10), torch.zeros(10)
    for step in range(160):
        selector.set_epoch(0 if step < 40 else 1)
        labels = torch.multinomial(weights, 128, replacement=True, generator=gen)
        feats = torch.where(
            (labels < 5).unsqueeze(1),
            0.05 * torch.randn(128, 16, generator=gen),
            3.0 * torch.randn(128, 16, generator=gen),
        )
        keep = selector.select(feats, labels) if selector.blocks_rows() else None
        rows = torch.arange(128) if keep is None else keep
        selector.observe(feats, keep, rows, None, labels[rows])
        if keep is not None:
            mask = torch.zeros(128).index_fill_(0, keep, 1.0)
            kept += torch.zeros(10).index_add_(0, labels, mask)
            seen += torch.bincount(labels, minlength=10).float()
    share = (kept / seen).tolist()
    frequent_dense, frequent_spread, rare = sum(share[:5]) / 5, sum(share[5:8]) / 3, sum(share[8:]) / 2
    assert abs(frequent_dense / frequent_spread - 1) < 0.1  # looking alike costs no class its share
    assert rare > 1.2 * frequent_spread  # rarity in the data is protected
