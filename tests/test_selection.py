import pytest
import torch

from pfb_train.selection import BlockingSchedule, build_selector
from pfb_train.selection.pfb import kde_log_density, silverman_bandwidth


def cluster_and_outliers(seed=0, dim=8, dense=120, far=8):
    """A dense Gaussian cluster at the origin and a few points ~8 sigma away on every axis."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randn(dense, dim, generator=g)
    outliers = torch.randn(far, dim, generator=g) + 8.0 * torch.sign(torch.randn(far, dim, generator=g))
    return torch.cat([cluster, outliers]), set(range(dense, dense + far))


@pytest.mark.parametrize("estimator", ["kde", "mean_log_kernel"])
@pytest.mark.parametrize("seed", range(5))
def test_pfb_keeps_rare_points_and_blocks_dense_ones(estimator, seed):
    feats, rare = cluster_and_outliers(seed)
    selector = build_selector("pfb", ratio=0.5, centers=32, feature_dim=8, estimator=estimator, seed=seed)
    selector.observe(feats[:64], None, None, None)  # centres from the cluster (as after warm-up)
    keep = selector.select(feats)
    kept = set(keep.tolist())
    assert len(kept) == 64
    assert rare <= kept  # every far-away point survives
    blocked = set(range(len(feats))) - kept
    assert blocked and not blocked & rare  # only cluster points are blocked


def test_pfb_blocks_the_densest_without_noise():
    feats, _ = cluster_and_outliers(dim=32)
    selector = build_selector("pfb", ratio=0.25, centers=32, feature_dim=32, estimator="kde", noise=0.0)
    selector.observe(feats[:64], None, None, None)
    keep = selector.select(feats)
    density = kde_log_density(feats, selector.centres, selector.counts / selector.counts.sum())
    blocked = torch.ones(len(feats), dtype=torch.bool)
    blocked[keep] = False
    assert density[blocked].min() >= density[keep].max()  # blocked = exactly the top-density rows


@pytest.mark.parametrize("method", ["pfb", "random"])
def test_seeded_selection_is_reproducible(method):
    feats, _ = cluster_and_outliers()

    def picks(seed):
        selector = build_selector(method, ratio=0.4, seed=seed, **({"centers": 16} if method == "pfb" else {}))
        return [selector.select(feats).tolist() for _ in range(3)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)


def test_linear_to_mid_ramp_matches_formula():
    schedule = BlockingSchedule(ratio=0.5, start=10, end=110, ramp="linear_to_mid")
    expected = lambda e: 0.5 * (0.2 + 0.8 * (min(e, 55) - 10) / (55 - 10))  # noqa: E731
    assert schedule.ratio_at(9) == 0.0
    assert schedule.ratio_at(10) == pytest.approx(0.1)
    for epoch in (10, 20, 37, 55, 80, 109):
        assert schedule.ratio_at(epoch) == pytest.approx(expected(epoch))
    assert schedule.ratio_at(55) == pytest.approx(0.5) and schedule.ratio_at(100) == pytest.approx(0.5)
    assert schedule.ratio_at(110) == 0.0


def test_constant_schedule_and_kept_count():
    schedule = BlockingSchedule(ratio=0.4, start=2, end=5)
    assert [schedule.ratio_at(e) for e in range(7)] == [0, 0, 0.4, 0.4, 0.4, 0, 0]
    assert schedule.kept(256, 3) == 256 - round(0.4 * 256)
    assert schedule.kept(256, 5) == 256


def test_ade_update_moves_each_centre_toward_its_assigned_mean():
    selector = build_selector("pfb", ratio=0.4, centers=4, feature_dim=2, ema=0.1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    selector._init_centres(centres)
    feats = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 1.0], [1.0, 8.0], [0.0, 12.0], [3.0, 1.0]])
    selector.update_centres(feats)
    means = {0: feats[[0, 1, 5]].mean(0), 1: feats[2], 2: feats[[3, 4]].mean(0)}
    for j, mean in means.items():
        assert torch.allclose(selector.centres[j], centres[j] + 0.1 * (mean - centres[j]))
    assert torch.equal(selector.centres[3], centres[3])  # no samples: unchanged
    assert selector.counts.tolist() == [3, 1, 2, 0]


def test_observe_uses_retained_rows_only_and_stops_after_end():
    selector = build_selector("pfb", ratio=0.5, centers=2, feature_dim=1, ema=1.0, start_epoch=0, end_epoch=3)
    selector._init_centres(torch.tensor([[0.0], [10.0]]))
    feats = torch.tensor([[1.0], [2.0], [9.0], [100.0]])
    selector.observe(feats, torch.tensor([0, 1, 2]), None, None)  # row 3 was blocked
    assert selector.centres.flatten().tolist() == [1.5, 9.0]
    selector.set_epoch(3)
    selector.observe(feats, None, None, None)
    assert selector.centres.flatten().tolist() == [1.5, 9.0]


def test_no_blocking_outside_window():
    selector = build_selector("pfb", ratio=0.4, centers=8, start_epoch=1, end_epoch=2)
    feats = torch.randn(32, 16)
    assert selector.select(feats) is None  # epoch 0: before start
    selector.set_epoch(1)
    assert len(selector.select(feats)) == 32 - round(0.4 * 32)
    selector.set_epoch(2)
    assert selector.select(feats) is None


def test_silverman_bandwidth_formula():
    centres = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    factor = (4 / 18) ** (1 / 20) * 64 ** (-1 / 20)
    assert torch.allclose(silverman_bandwidth(centres), factor * centres.std(0))


def test_kde_is_float32_and_finite_for_far_points():
    centres = torch.randn(16, 128)
    far = torch.full((2, 128), 1e3)
    s = kde_log_density(far, centres, torch.full((16,), 1 / 16))
    assert s.dtype == torch.float32 and torch.isfinite(s).all() and (s < -1e4).all()


def test_state_dict_round_trip_reproduces_next_selection():
    feats = torch.randn(64, 32)
    a = build_selector("pfb", ratio=0.4, centers=16, seed=3)
    a.observe(feats, None, None, None)
    a.select(feats)
    b = build_selector("pfb", ratio=0.4, centers=16, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.select(feats), b.select(feats))


def test_unknown_method_is_user_error():
    from pfb_train.errors import UserError

    with pytest.raises(UserError, match="choose one of: none, random, pfb"):
        build_selector("bogus")
