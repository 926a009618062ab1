"""Recompute mode's ranking pass (blocking.pfb.score_scale / score_norm), its cost model, and
`runtime.compile` without recompiles inside an epoch."""

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from pfb_train.config import load_config
from pfb_train.costs import (
    PartTimes,
    cheaper_mode,
    predicted_cost_ratio,
    predicted_time_ratio,
    step_flops,
    timed_cheaper_mode,
)
from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
from pfb_train.errors import UserError
from pfb_train.models import BlockedModel, check_score_pass, split_model, tracking_norms
from pfb_train.selection.score_pass import AUTO_SCORE, ScorePass
from pfb_train.selection import build_selector
from helpers import TINY_YAML as TINY


def _stats(blocked):
    return [
        b.clone() for m in tracking_norms(blocked.model) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    blocked = split_model(timm.create_model("resnet18", num_classes=5), 1, "recompute").train()
    for m in tracking_norms(blocked.model):  # running statistics that differ from any batch's
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    return blocked


def test_exact_ranking_pass_uses_batch_statistics_and_changes_no_state(resnet):
    x = torch.randn(8, 3, 32, 32)
    before = _stats(resnet)
    feats = resnet.score_features(x)
    assert _same(before, _stats(resnet))  # running statistics and batches seen as they were
    plain = copy.deepcopy(resnet.model).train()
    with torch.no_grad():
        h = plain.layer1(plain.maxpool(plain.act1(plain.bn1(plain.conv1(x)))))
    assert feats.dtype == torch.float32 and feats.shape == (8, 64)
    assert torch.allclose(feats, h.mean((2, 3)), atol=1e-6)
    assert resnet.training and not feats.requires_grad


def test_cheaper_ranking_pass_resizes_and_reads_running_statistics(resnet):
    x = torch.randn(8, 3, 32, 32)
    before = _stats(resnet)
    half = resnet.score_features(x, ScorePass(0.5, "batch"))
    running = resnet.score_features(x, ScorePass(1.0, "running"))
    assert _same(before, _stats(resnet))
    assert resnet.training and all(m.training for m in resnet.shallow.modules())  # train mode restored
    plain, evaluated = copy.deepcopy(resnet), copy.deepcopy(resnet).eval()
    with torch.no_grad():
        expected = plain.pooled_features(plain.shallow(F.avg_pool2d(x, 2)))  # area at 1/2: 2x2 means
        assert torch.allclose(half, expected, atol=1e-6)
        assert torch.allclose(running, evaluated.pooled_features(evaluated.shallow(x)), atol=1e-6)
    assert not torch.allclose(running, resnet.score_features(x), atol=1e-3)  # the statistics did differ


def test_blocked_step_trains_the_kept_rows_at_full_size_whatever_the_ranking_pass(resnet):
    x = torch.randn(8, 3, 32, 32)
    keep = torch.tensor([0, 2, 3, 7])
    plain = copy.deepcopy(resnet.model)
    out = resnet(x, select=lambda feats: keep, score=ScorePass(0.5, "running"))
    assert out.feats.shape == (8, 64)
    expected = plain(x[keep])  # train mode: the kept rows alone update the statistics
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert _same(
        _stats(resnet),
        [b for m in tracking_norms(plain) for b in (m.running_mean, m.running_var, m.num_batches_tracked)],
    )


def test_score_options_are_checked_with_one_line_errors(tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    for bad, words in [
        (["blocking.pfb.score_scale=0"], "must be in (0, 1] or null"),
        (["blocking.pfb.score_scale=1.5"], "must be in (0, 1] or null"),
        (["blocking.pfb.score_norm=eval"], "score_norm"),
        (["blocking.mode=reuse", "blocking.pfb.score_scale=0.5"], "blocking.mode 'reuse' ranks by"),
        (["blocking.mode=reuse", "blocking.pfb.score_norm=running"], "set blocking.mode recompute"),
    ]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
            load_config(str(tiny), bad)
        assert "\n" not in str(e.value)
    ok = load_config(str(tiny), ["blocking.mode=recompute", "blocking.pfb.score_scale=0.5"])
    assert ok.blocking.chosen().score_scale == 0.5
    load_config(str(tiny), ["blocking.mode=reuse"])  # the automatic defaults go with either mode


@pytest.mark.parametrize(
    "name,resolved",
    [
        ("resnet18", ScorePass(0.5, "running")),
        ("convnext_atto", ScorePass(0.5, "batch")),
        ("swin_tiny_patch4_window7_224", ScorePass(1.0, "batch")),
        ("vit_tiny_patch16_224", ScorePass(1.0, "batch")),
    ],
)
def test_the_default_ranking_pass_is_the_cheapest_the_model_takes(name, resolved):
    """score_scale null / score_norm auto: half size where the shallow part runs on it, running
    statistics where it has BatchNorm; what a model cannot take falls back to the exact setting."""
    with torch.device("meta"):
        blocked = split_model(timm.create_model(name, num_classes=5), 1, "recompute")
    options = load_config("demo", ["blocking.method=pfb"]).blocking.chosen()
    assert (options.score_scale, options.score_norm) == (None, "auto")
    assert check_score_pass(blocked, AUTO_SCORE, 224) == resolved
    assert blocked.resolve_score(ScorePass(None, "batch"), 224).norm == "batch"  # explicit parts stay


@pytest.mark.parametrize(
    "name,score,words",
    [
        ("vit_tiny_patch16_224", ScorePass(0.5), "score_scale 0.5 feeds 'vit_tiny_patch16_224' 112 px"),
        ("convnext_atto", ScorePass(1.0, "running"), "score_norm 'running' needs BatchNorm"),
    ],
)
def test_models_that_cannot_take_the_ranking_pass_say_so(name, score, words):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5)
    blocked = BlockedModel(model.to_empty(device="cpu"), 1, "recompute")
    with pytest.raises(UserError, match=words) as e:
        check_score_pass(blocked, score, 224)
    assert "\n" not in str(e.value)
    check_score_pass(split_model(timm.create_model("resnet18"), 1, "recompute"), ScorePass(0.5, "running"), 224)


@pytest.mark.parametrize("scale", [0.5, 0.75])
def test_flop_ratio_of_a_cheaper_ranking_pass_matches_the_cost_model(scale):
    with torch.device("meta"):
        blocked = split_model(timm.create_model("resnet50", num_classes=1000), 1, "recompute")
        x = torch.empty(16, 3, 224, 224)
    ratio = step_flops(blocked, x, 10, ScorePass(scale)) / step_flops(blocked, x, None)
    exact = step_flops(blocked, x, 10) / step_flops(blocked, x, None)
    share = 0.192  # stem + layer1 of resnet50 at 224 px (tests/test_info_bench.py)
    assert ratio == pytest.approx(predicted_cost_ratio("recompute", share, 6 / 16, scale), rel=0.02)
    assert ratio < exact  # and the saving is the ranking pass's: s (1 - q^2) / 3 of a step
    assert exact - ratio == pytest.approx(share * (1 - scale**2) / 3, rel=0.05)


def test_mode_choice_by_flops_and_by_measured_time():
    assert cheaper_mode(0.3) == "reuse" and cheaper_mode(0.34) == "recompute"
    assert cheaper_mode(0.1, score_scale=0.5) == "recompute"  # p > q^2 / 3 = 0.083
    assert cheaper_mode(0.08, score_scale=0.5) == "reuse"
    # resnet50 bf16 on an H200 (docs/BENCHMARKS.md): recompute 0.879, reuse 0.943 of a full step,
    # where the FLOP-weighted and the time-share-weighted models both favour reuse.
    gpu = PartTimes(full=54.2, reuse=0.943 * 54.2, recompute=0.879 * 54.2, shallow=0.47 * 54.2, score=12.4)
    assert predicted_time_ratio("recompute", gpu) == pytest.approx(0.879)
    assert timed_cheaper_mode(gpu) == "recompute"
    assert timed_cheaper_mode(gpu.__class__(**{**vars(gpu), "reuse": 40.0})) == "reuse"


def test_timing_the_parts_leaves_the_model_as_it_was():
    from pfb_train.calibrate import choose_mode

    resnet = split_model(timm.create_model("test_resnet", num_classes=5), 1, "recompute")
    state = copy.deepcopy(resnet.state_dict())
    rng = torch.get_rng_state()
    choice = choose_mode(resnet, (8, 3, 32, 32), 0.5, score=ScorePass(0.5), warmup=1, repeats=1)
    t = choice.times
    assert choice.mode in ("reuse", "recompute") and min(t.full, t.reuse, t.recompute, t.shallow, t.score) > 0
    assert "timed on cpu" in choice.reason and resnet.mode == "recompute" and resnet.training
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in resnet.parameters())


def _steps_with_graph_counts(monkeypatch, cfg):
    """Run `cfg` with runtime.compile (TorchDynamo with the eager backend: the guards and recompiles
    are the same as inductor's, without its minutes of codegen); returns [(epoch, graphs before, after)]."""
    import pfb_train.engine as engine
    from pfb_train.train import run

    original = BlockedModel.compile_parts
    monkeypatch.setattr(BlockedModel, "compile_parts", lambda self: original(self, backend="eager"))
    seen = []

    @functools.wraps(train_step)
    def counted(batch, context, *args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        result = train_step(batch, context, *args, **kwargs)
        seen.append((context.selector.epoch, before, counters["stats"]["unique_graphs"]))
        return result

    monkeypatch.setattr(engine, "train_step", counted)
    torch._dynamo.reset()
    counters.clear()
    return seen, run(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "blocking.pfb.ramp=linear_to_mid",
            "blocking.pfb.end_epoch=3",
            "blocking.mode=recompute",
            "blocking.pfb.score_scale=0.5",
            "blocking.pfb.score_norm=running",
        ],
        ["blocking.method=random", "blocking.random.start_epoch=0", "blocking.mode=reuse"],
        ["blocking.method=infobatch", "blocking.infobatch.prune_ratio=0.5"],
    ],
)
def test_compiled_runs_compile_only_at_the_first_blocked_steps_of_an_epoch(monkeypatch, tmp_path, capsys, overrides):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    cfg = load_config(
        str(tiny),
        [
            "schedule.epochs=3",
            "blocking.pfb.start_epoch=0",
            "runtime.compile=true",
            "data.train_samples=96",
            f"runtime.output={tmp_path}",
            *overrides,
        ],
    )
    seen, summary = _steps_with_graph_counts(monkeypatch, cfg)
    assert sorted({epoch for epoch, _, _ in seen}) == [0, 1, 2] and seen[-1][2] > 0
    for epoch in (0, 1, 2):
        steps = [(before, after) for e, before, after in seen if e == epoch]
        assert all(before == after for before, after in steps[1:]), (epoch, steps)  # only step 1 compiles
    if "linear_to_mid" not in overrides[0]:  # the same kept count every epoch: nothing new after epoch 0
        assert all(before == after for e, before, after in seen if e > 0), seen
    else:  # what ran, and why, is on the run line and in summary.json
        assert summary["blocking_mode"] == "recompute" and summary["blocking_mode_reason"] == "set in the config"
        assert summary["ranking_pass"] == {"scale": 0.5, "norm": "running"}
        assert (
            "(mode recompute: set in the config; ranking pass at 0.5x, running statistics)" in capsys.readouterr().out
        )
    if "blocking.method=infobatch" in overrides:
        assert "(mode reuse: auto: infobatch blocks no rows in the batch)" in capsys.readouterr().out


def test_compiled_step_matches_the_eager_step():
    """TorchDynamo + AOTAutograd (aot_eager) against eager, ranking pass scaled: same rows kept, same
    loss, same weights after two steps. (Inductor's kernels: tests/test_gpu.py, on CUDA.)"""
    torch.manual_seed(0)
    base = timm.create_model("test_resnet", num_classes=10)
    x, y, indices = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), torch.arange(16)
    outcome = []
    for compiled in (False, True):
        blocked = split_model(copy.deepcopy(base), 1, "recompute")
        if compiled:
            blocked.compile_parts(backend="aot_eager")
        selector = build_selector("pfb", ratio=0.4, centres=8, score_scale=0.5, num_classes=10)
        optimization = Optimization(
            torch.optim.SGD(blocked.parameters(), lr=0.1), None, torch.amp.GradScaler("cpu", enabled=False)
        )
        context = StepContext(blocked, selector, StepSettings(torch.device("cpu")), optimization)
        steps = [train_step(Batch(x, y, indices), context, 1.0) for _ in range(2)]
        outcome.append((steps, [p.detach().clone() for p in blocked.parameters()], _stats(blocked)))
    (eager, w_eager, s_eager), (comp, w_comp, s_comp) = outcome
    for a, b in zip(eager, comp):
        assert torch.equal(a.keep, b.keep)
        assert torch.allclose(a.loss, b.loss, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w_eager, w_comp))
    assert all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(s_eager, s_comp))


def test_running_ranking_pass_leaves_an_eval_model_in_eval_and_the_api_checks_the_model():
    blocked = split_model(timm.create_model("test_resnet", num_classes=5), 1, "recompute").eval()
    blocked.score_features(torch.randn(4, 3, 32, 32), ScorePass(1.0, "running"))
    assert not any(m.training for m in blocked.model.modules())
    import pfb_train

    with pytest.raises(UserError, match="score_scale 0.5 feeds 'vit_tiny_patch16_224'"):
        pfb_train.Blocking(timm.create_model("vit_tiny_patch16_224", num_classes=4), "pfb", ratio=0.4, score_scale=0.5)
