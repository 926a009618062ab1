"""schedule.budget: compute counted by the cost model, a run that ends with its budget, its LR schedule and
windows stretched over it, exact resume, a seconds budget; what `info` and `report` say of compute."""

import json

import pytest
import torch

from pfb_train.budget import RunClock, budget_epochs
from pfb_train.config import load_config
from pfb_train.costs import predicted_cost_ratio, shallow_flop_share, step_flops
from pfb_train.distributed import DistInfo
from pfb_train.errors import RunFinished, UserError
from pfb_train.run_dir import read_metrics
from pfb_train.models import build_model
from pfb_train.selection.score_pass import NO_RANKING
from pfb_train.report import compute_to_reach, top1_at_compute
from pfb_train.train import fit, run, setup
from helpers import SMALL_CPU_RUN

# 96 samples in batches of 16: 6 steps per full-data epoch; ratio 0.25 blocks exactly 4 rows of 16
TINY = [
    *SMALL_CPU_RUN,
    "model.name=test_resnet",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=96",
    "data.val_samples=32",
    "schedule.epochs=4",
    "schedule.warmup_epochs=1",
    "schedule.min_lr=0.001",
    "blocking.pfb.centres=8",
    "blocking.pfb.ratio=0.25",
    "blocking.random.ratio=0.25",
    "blocking.static_random.drop_fraction=0.25",
    "blocking.infobatch.prune_ratio=0.5",
]
STEPS = 6


def train(tmp_path, *overrides, name="run"):
    return run(load_config(None, [*TINY, *overrides, f"name={name}", f"runtime.output={tmp_path}"]))


def shallow_share(cfg_overrides=()) -> float:
    cfg = load_config(None, [*TINY, *cfg_overrides])
    with torch.device("meta"):
        net = build_model(cfg.model, cfg.blocking.stage, 10, "reuse", img_size=cfg.data.img_size)
    return shallow_flop_share(net, cfg.data.img_size)


@pytest.mark.parametrize("mode, scale", [("reuse", 1.0), ("recompute", 0.5)])
def test_compute_is_the_cost_model_of_the_realised_rows(tmp_path, mode, scale):
    """One full-data epoch, then two at ratio 0.25 (start_epoch 1): 1 + 2 x the cost model's ratio."""
    summary = train(
        tmp_path,
        "blocking.method=pfb",
        "blocking.pfb.start_epoch=1",
        f"blocking.mode={mode}",
        f"blocking.pfb.score_scale={scale}",
        "schedule.epochs=3",
    )
    ratio = predicted_cost_ratio(mode, shallow_share(), 0.25, scale)
    compute = [r["compute"] for r in read_metrics(summary["run_dir"])]
    assert compute == pytest.approx([1, 1 + ratio, 1 + 2 * ratio], rel=1e-9)
    assert summary["compute_spent"] == compute[-1]


def test_sampler_level_epochs_cost_their_steps_and_random_blocking_runs_no_ranking_pass(tmp_path):
    static = train(
        tmp_path,
        "blocking.method=static_random",
        "blocking.static_random.drop_fraction=0.33",
        "schedule.epochs=2",
        name="static",
    )
    assert static["compute_spent"] == pytest.approx(2 * 4 / STEPS)  # 64 of 96 samples: 4 steps of 6
    random = train(tmp_path, "blocking.method=random", "schedule.epochs=2", name="random")
    assert random["blocking_mode"] == "recompute"  # auto: with no ranking pass, recompute costs the kept rows only
    assert random["compute_spent"] == pytest.approx(2 * 0.75)


def test_no_ranking_pass_costs_the_kept_rows_alone():
    cfg = load_config(None, TINY)
    net = build_model(cfg.model, 1, 10, "recompute", img_size=32)
    x = torch.randn(16, 3, 32, 32)
    assert step_flops(net, x, kept=12, score=NO_RANKING) == step_flops(net, x[:12], kept=None)
    assert net.score_features(x, NO_RANKING).shape == (16, 0)


@pytest.mark.parametrize("method", ["none", "pfb", "random", "infobatch", "static_random"])
def test_a_budgeted_run_ends_within_one_step_of_its_budget_with_the_lr_at_its_end(tmp_path, method):
    budget = 2.5
    summary = train(tmp_path, f"blocking.method={method}", f"schedule.budget={budget}")
    records = read_metrics(summary["run_dir"])
    spent = summary["compute_spent"]
    assert budget - 1e-9 <= spent < budget + 1 / STEPS  # a step costs at most one full-data step
    assert records[-1]["lr"] == pytest.approx(0.001)  # cosine's end value, schedule.min_lr
    assert "top1" in records[-1] and summary["budget"] == budget and summary["budget_unit"] == "epochs"
    if method == "none":
        assert len(records) == 3 and records[-1]["epoch_fraction"] == 0.5
    else:  # cheaper epochs: more of them within the budget
        assert len(records) > 3 and 0 < records[-1].get("epoch_fraction", 1) <= 1
    if method == "infobatch":  # InfoBatch's last (1 - delta) of the schedule is full data: here of the budget
        assert records[-1]["kept_fraction"] == 1.0 and records[1]["kept_fraction"] < 1.0


def test_windows_and_warmup_are_read_on_the_budget_stretched_schedule(tmp_path, capsys):
    """schedule.epochs 4 over a budget of 2: blocking from start_epoch 2 starts half-way through the
    compute, at epoch 1; the warm-up (1 schedule epoch) ends a quarter of the way, inside epoch 0."""
    summary = train(tmp_path, "blocking.method=pfb", "blocking.pfb.start_epoch=2", "schedule.budget=2")
    out = capsys.readouterr().out
    assert "budget 2 full-data epochs of compute (schedule.epochs 4 stretched over it)" in out
    assert f"compute {summary['compute_spent']:.2f} full-data epochs" in out.splitlines()[-1]
    kept = [r["kept_fraction"] for r in read_metrics(summary["run_dir"])]
    assert kept[0] == 1.0 and all(k == 0.75 for k in kept[1:])
    lr = read_metrics(summary["run_dir"])[0]["lr"]  # after epoch 0: half-way (2 of 4 schedule epochs)
    assert lr == pytest.approx(0.001 + 0.5 * (0.1 - 0.001) * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))


def test_resume_inside_a_budgeted_epoch_is_exact(tmp_path):
    steps = ["blocking.method=pfb", "blocking.pfb.start_epoch=1", "schedule.budget=2.5", "runtime.checkpoint_every=4"]
    whole = run(load_config(None, [*TINY, *steps, "name=cut", f"runtime.output={tmp_path}/a"]))
    first = setup(load_config(None, [*TINY, *steps, "name=cut", f"runtime.output={tmp_path}/b"]), DistInfo())
    fit(first, until_step=9)  # inside epoch 1
    resumed = run(load_config(None, [*TINY, *steps, "name=cut", f"runtime.output={tmp_path}/b", "runtime.resume=auto"]))
    a = torch.load(f"{whole['run_dir']}/checkpoint-last.pt", weights_only=False)
    b = torch.load(f"{resumed['run_dir']}/checkpoint-last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"]
    for key in ("compute", "lr", "kept_fraction", "top1", "epoch_fraction"):
        assert [r.get(key) for r in read_metrics(whole["run_dir"])] == [
            r.get(key) for r in read_metrics(resumed["run_dir"])
        ], key


def test_resume_inside_an_epoch_with_another_batch_size_counts_compute_in_todays_steps(tmp_path):
    steps = ["schedule.budget=2.5", "runtime.checkpoint_every=3"]
    first = setup(load_config(None, [*TINY, *steps, "name=cut", f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_step=9)  # half of epoch 1: 3 of its 6 steps of 16
    resumed = run(
        load_config(
            None, [*TINY, *steps, "name=cut", f"runtime.output={tmp_path}", "runtime.resume=auto", "data.batch_size=32"]
        )
    )  # the other 48 samples: 1 step of 32 (of 3 per epoch)
    records = read_metrics(resumed["run_dir"])
    assert records[1]["compute"] == pytest.approx(1 + 3 / 6 + 1 / 3)
    assert 2.5 - 1e-9 <= resumed["compute_spent"] < 2.5 + 1 / 3


def test_a_seconds_budget_stops_on_time(tmp_path, monkeypatch):
    """Time after an epoch's last step (here a slow epoch_diagnostics) counts too, and the epoch in which the
    budget runs out is the last one, evaluated, whether it ran out at a step or after the last one."""
    import time

    from pfb_train.selection.base import Selector

    monkeypatch.setattr(Selector, "epoch_diagnostics", lambda self, device: time.sleep(0.2) or {})
    budget = 1.5
    summary = train(
        tmp_path,
        "schedule.budget_unit=seconds",
        f"schedule.budget={budget}",
        "schedule.epochs=1000",
        "runtime.eval_every=1000",
    )
    assert budget <= summary["train_seconds"] < budget + 1.0  # test_resnet steps take milliseconds
    assert summary["epochs"] < 1000
    records = read_metrics(summary["run_dir"])
    assert "top1" in records[-1] and records[-1]["seconds_spent"] == pytest.approx(summary["train_seconds"])
    stored = torch.load(f"{summary['run_dir']}/checkpoint-last.pt", weights_only=False)
    assert sum(r["epoch_seconds"] for r in stored["history"]) == pytest.approx(summary["train_seconds"])
    ran_out_at_a_step = "epoch_fraction" in records[-1]
    if ran_out_at_a_step:
        assert records[-1]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.budget=0"], "config key 'schedule.budget' must be > 0 and finite"),
        (["schedule.budget=.inf"], "config key 'schedule.budget' must be > 0 and finite"),
        (["schedule.budget_unit=seconds"], "config key 'schedule.budget_unit' 'seconds' needs a schedule.budget"),
        (["schedule.budget_unit=hours", "schedule.budget=1"], "schedule.budget_unit"),
    ],
)
def test_budget_settings_without_meaning_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [*TINY, *overrides])


def test_a_finished_budgeted_run_says_how_to_train_longer(tmp_path):
    train(tmp_path, "schedule.budget=1", name="done")
    with pytest.raises(RunFinished, match=r"schedule.budget=1.5 \(the schedule stretches"):
        train(tmp_path, "schedule.budget=1", "runtime.resume=auto", name="done")
    longer = train(tmp_path, "schedule.budget=1.5", "runtime.resume=auto", name="done")  # as the line says
    assert 1.5 <= longer["compute_spent"] < 1.5 + 1 / STEPS and len(read_metrics(longer["run_dir"])) == 2


@pytest.mark.parametrize(
    "now, message",
    [
        ([], "has no schedule.budget; set schedule.budget=1 schedule.budget_unit=epochs to go on"),
        (["schedule.budget=5", "schedule.budget_unit=seconds"], "this config has schedule.budget 5 seconds"),
    ],
)
def test_a_resume_that_changes_what_the_schedule_is_measured_in_is_one_line(tmp_path, now, message):
    first = setup(load_config(None, [*TINY, "schedule.budget=1", "name=r", f"runtime.output={tmp_path}"]), DistInfo())
    fit(first, until_step=3)
    with pytest.raises(UserError, match=message):
        train(tmp_path, *now, "runtime.resume=auto", name="r")


def test_info_gives_the_epochs_a_budget_buys():
    from pfb_train.info import model_info

    window = ["blocking.method=pfb", "blocking.pfb.start_epoch=1", "blocking.pfb.end_epoch=3", "schedule.budget=6"]
    info = model_info(load_config(None, [*TINY, *window, "blocking.mode=reuse"]))
    cost = info["predicted_ratio"]["reuse"]  # half of the schedule (epochs 1-3 of 4) blocks
    assert info["budget_epochs"] == pytest.approx(3 + 3 / cost, rel=1e-6) and not info["budget_epochs_bound"]
    assert model_info(load_config(None, [*TINY, "schedule.budget=6"]))["budget_epochs"] == pytest.approx(6)
    sampler = model_info(load_config(None, [*TINY, "blocking.method=static_random", "schedule.budget=6"]))
    assert sampler["budget_epochs"] == pytest.approx(6 / 0.75) and sampler["budget_epochs_bound"]
    assert "budget_epochs" not in model_info(load_config(None, TINY))


def test_budget_epochs_and_the_clock():
    assert budget_epochs(6, 10, lambda t: 0.5 if 1 <= t < 9 else 1.0) == pytest.approx(1.2 + 4.8 / 0.5)
    clock = RunClock(epochs=10, budget=6)
    assert clock.position(3, compute=3.0, seconds=99) == 5.0 and clock.position(0, 7.0, 0) == 10
    assert not clock.ended(50, 5.9, 0) and clock.ended(0, 6.0, 0)
    assert RunClock(epochs=10).position(2.5, 99, 99) == 2.5 and RunClock(epochs=10).ended(10, 0, 0)


def test_time_to_accuracy_reads_the_validation_curve():
    curve = [(1.0, 60.0), (2.0, 70.0), (3.0, 80.0)]
    assert compute_to_reach(curve, 75.0) == pytest.approx(2.5)
    assert compute_to_reach(curve, 55.0) == 1.0 and compute_to_reach(curve, 81.0) is None
    assert top1_at_compute(curve, 1.5) == pytest.approx(65.0)
    assert top1_at_compute(curve, 3.02) == 80.0  # within a step of the end: its last evaluation
    assert top1_at_compute(curve, 3.5) is None and top1_at_compute(curve, 0.5) is None


def test_report_tables_top1_at_equal_compute_and_compute_to_the_baselines_top1(tmp_path):
    from pfb_train.report import report

    def fake(name, seed, method, curve):
        path = tmp_path / name
        path.mkdir()
        from pfb_train.config import Config
        import yaml

        config = Config().to_dict()
        config["name"], config["runtime"]["seed"], config["blocking"]["method"] = name, seed, method
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        records = [
            {"epoch": e, "epoch_seconds": 1.0, "top1": t, "compute": c, "kept_fraction": 1.0, "samples_blocked": 0}
            for e, (c, t) in enumerate(curve)
        ]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "method": method,
                    "ratio": 0.4,
                    "ratio_option": None if method == "none" else "ratio",
                    "top1": curve[-1][1],
                    "blocked_fraction": 0.0,
                    "train_seconds": 1.0 * len(curve),
                    "compute_spent": curve[-1][0],
                    "world_size": 1,
                }
            )
        )
        return str(path)

    base = [fake(f"full{s}", s, "none", [(1.0, 60.0), (2.0, 70.0 + s)]) for s in (0, 1)]  # final 70.5 on average
    pfb = [fake(f"pfb{s}", s, "pfb", [(0.6, 62.0), (1.2, 71.0), (2.01, 72.0 + s)]) for s in (0, 1)]
    slow = [fake("rnd0", 0, "random", [(1.0, 50.0), (2.0, 65.0)])]
    result = report(pfb + slow, base, str(tmp_path / "rep"))
    rows = {r["method"]: r for r in result["rows"]}
    at = [71 + (1 + s) * 0.8 / 0.81 for s in (0, 1)]  # read at the baseline's 2.0 epochs, between evaluations
    assert rows["pfb"]["top1_at_compute"] == pytest.approx(sum(at) / 2)
    assert rows["pfb"]["compute_to_target"] == pytest.approx(0.6 + 0.6 * (70.5 - 62) / 9)
    assert rows["random"]["compute_to_target"] is None
    full = rows["none"]  # seed 0 ends at 70.0, under the mean final top-1: only seed 1 reaches it
    assert full["compute_to_target"] == pytest.approx(1 + 10.5 / 11) and full["seeds_reaching_target"] == 1
    assert "compute to 70.50 %" in result["markdown"] and "| not reached |" in result["markdown"]
    assert "1.95 (1/2 seeds)" in result["markdown"]
    if result["plots"]:  # matplotlib installed
        assert (tmp_path / "rep" / "top1_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
