import pytest
import torch

from pfb_train.config import load_config
from pfb_train.run_dir import read_metrics
from pfb_train.selection import build_selector
from pfb_train.train import run
from helpers import SMALL_CPU_RUN


def infobatch_with_scores(scores, ratio=0.3, epochs=8, delta=0.875):
    selector = build_selector("infobatch", prune_ratio=ratio, epochs=epochs, delta=delta, seed=0)
    selector.epoch_indices(len(scores))  # epoch 0: creates the score table (all 3.0)
    selector.observe(None, None, torch.arange(len(scores)), torch.as_tensor(scores, dtype=torch.float32))
    selector.set_epoch(1)
    return selector


def test_candidates_are_exactly_the_below_mean_scores():
    scores = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    selector = infobatch_with_scores(scores)
    kept = torch.zeros(4000, dtype=torch.bool)
    kept[selector.epoch_indices(4000)] = True
    below = scores < scores.mean()
    assert kept[~below].all()  # every sample at or above the mean is kept
    assert (~kept).any() and below[~kept].all()  # everything skipped is a candidate


def test_kept_fraction_of_candidates_and_rescaling():
    scores = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    ratio = 0.3
    selector = infobatch_with_scores(scores, ratio=ratio)
    kept = torch.zeros(20000, dtype=torch.bool)
    kept[selector.epoch_indices(20000)] = True
    below = scores < scores.mean()
    assert kept[below].float().mean() == pytest.approx(1 - ratio, abs=0.015)
    weights = selector.loss_weights(torch.arange(20000))
    assert torch.allclose(weights[below & kept], torch.tensor(1 / (1 - ratio)))
    assert torch.equal(weights[~below], torch.ones(int((~below).sum())))


def test_full_data_in_annealing_epochs():
    selector = infobatch_with_scores(torch.rand(100), epochs=8, delta=0.875)  # prunes epochs 0..6
    selector.set_epoch(6)
    assert selector.epoch_indices(100) is not None
    selector.set_epoch(7)
    assert selector.epoch_indices(100) is None
    assert selector.loss_weights(torch.arange(10)) is None


def test_first_epoch_is_full_data_and_observe_records_losses():
    selector = build_selector("infobatch", prune_ratio=0.5, epochs=4)
    assert selector.epoch_indices(10) is None  # all scores 3.0: nothing below the mean
    selector.observe(None, None, torch.tensor([2, 7]), torch.tensor([0.5, 9.0]))
    assert selector.scores[2] == 0.5 and selector.scores[7] == 9.0 and selector.scores[0] == 3.0


def test_subset_does_not_depend_on_the_rank_seed_only_on_run_seed_and_epoch():
    a, b = infobatch_with_scores(torch.rand(500)), infobatch_with_scores(torch.rand(500))
    a.scores = b.scores.clone()
    assert torch.equal(a.epoch_indices(500), b.epoch_indices(500))


def test_static_random_is_one_fixed_subset():
    selector = build_selector("static_random", drop_fraction=0.3, seed=4)
    first = selector.epoch_indices(1000)
    selector.set_epoch(5)
    assert torch.equal(first, selector.epoch_indices(1000)) and len(first) == 700


TINY = [
    *SMALL_CPU_RUN,
    "model.name=resnet18",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=160",
    "data.val_samples=32",
    "schedule.epochs=4",
    "schedule.warmup_epochs=0",
    "blocking.pfb.centres=8",
]


@pytest.mark.parametrize("method", ["infobatch", "static_random"])
def test_sampler_level_run_reports_realised_fraction(tmp_path, method):
    summary = run(
        load_config(
            None,
            [
                *TINY,
                f"blocking.method={method}",
                "blocking.pfb.ratio=0.5",
                "blocking.random.ratio=0.5",
                "blocking.infobatch.prune_ratio=0.5",
                "blocking.static_random.drop_fraction=0.5",
                "blocking.infobatch.delta=0.75",
                f"runtime.output={tmp_path}",
            ],
        )
    )
    records = read_metrics(summary["run_dir"])
    pruned = [r["samples_pruned"] for r in records]
    assert all(r["samples_blocked"] == 0 for r in records)  # nothing is blocked inside a batch
    assert all(r["samples_seen"] + r["samples_pruned"] == 160 for r in records)
    if method == "infobatch":
        assert pruned[0] == 0 and pruned[-1] == 0  # first epoch: no scores yet; last: annealing
        assert sum(pruned[1:3]) > 0
    else:
        assert pruned == [80] * 4
    assert summary["blocked_fraction"] == pytest.approx(sum(pruned) / (160 * 4))
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-6)  # the schedule ends on time despite fewer steps
