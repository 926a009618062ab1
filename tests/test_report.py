import csv
from pathlib import Path

import pytest

from pfb_train.config import load_config
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.train import run
from helpers import SMALL_CPU_RUN, run_main

TINY = [
    *SMALL_CPU_RUN,
    "model.name=resnet18",
    "data.img_size=32",
    "data.batch_size=16",
    "data.train_samples=96",
    "data.val_samples=32",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "blocking.pfb.centres=8",
    "blocking.pfb.ratio=0.25",
    "blocking.random.ratio=0.25",
    "blocking.infobatch.prune_ratio=0.25",
    "blocking.static_random.drop_fraction=0.25",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {
        "full0": ["blocking.method=none", "runtime.seed=0"],
        "full1": ["blocking.method=none", "runtime.seed=1"],
        "pfb": ["blocking.method=pfb"],
    }.items():
        made[name] = run(load_config(None, [*TINY, *extra, f"name={name}", f"runtime.output={out}"]))
    return made


def test_report_table_and_plots_match_the_runs(runs, capsys, tmp_path):
    full0, full1, pfb = runs["full0"], runs["full1"], runs["pfb"]
    result = run_main(
        capsys,
        "report",
        pfb["run_dir"],
        "--baseline",
        full0["run_dir"],
        "--baseline",
        full1["run_dir"],
        "--out",
        str(tmp_path / "rep"),
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "rep" / "report.csv")))
    by_method = {r["method"]: r for r in rows}
    assert by_method["none"]["seeds"] == "2"  # two seeds of full data: one row
    base_top1 = (full0["top1"] + full1["top1"]) / 2
    assert float(by_method["none"]["top1"]) == pytest.approx(base_top1)
    row = by_method["pfb"]
    assert float(row["top1"]) == pytest.approx(pfb["top1"])
    assert float(row["top1_delta"]) == pytest.approx(pfb["top1"] - base_top1)
    assert float(row["blocked_fraction"]) == pytest.approx(pfb["blocked_fraction"]) == pytest.approx(0.25)
    assert float(row["selection_hours"]) == pytest.approx(pfb["selection_seconds"] / 3600)
    # with two seeds the per-epoch median is their mean: robust time = the mean total
    base_hours = (full0["train_seconds"] + full1["train_seconds"]) / 2 / 3600
    assert float(row["time_reduction_pct"]) == pytest.approx(100 * (1 - pfb["train_seconds"] / 3600 / base_hours))
    md = (tmp_path / "rep" / "report.md").read_text()
    signals = [m["selection_signal"] for m in read_metrics(pfb["run_dir"])]
    signal = sum(signals) / len(signals)  # the row's signal: mean over its blocking epochs
    assert f"{pfb['top1']:.2f}" in md and f"| pfb 0.25 | 1 | 0.250 | {signal:.2f} |" in md
    assert "| full data | 2 | 0.000 | - |" in md
    assert md in result.stdout
    for name in ("top1.png", "wallclock.png", "kept_fraction.png", "selection_signal.png", "class_kept_fraction.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_unfinished_run_dir(capsys, tmp_path):
    result = run_main(capsys, "report", str(tmp_path), "--baseline", str(tmp_path))
    assert result.returncode == 2 and "not a finished run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_live_comparison_with_a_baseline_run(runs, tmp_path, capsys):
    full = runs["full0"]
    summary = run(
        load_config(
            None, [*TINY, "blocking.method=pfb", f"runtime.baseline={full['run_dir']}", f"runtime.output={tmp_path}"]
        )
    )
    ours, theirs = read_metrics(summary["run_dir"]), read_metrics(full["run_dir"])
    for epoch, (a, b) in enumerate(zip(ours, theirs)):
        assert a["vs_baseline_top1"] == pytest.approx(a["top1"] - b["top1"])
        mine = sum(r["epoch_seconds"] for r in ours[: epoch + 1])
        base = sum(r["epoch_seconds"] for r in theirs[: epoch + 1])
        assert a["vs_baseline_time_saved_pct"] == pytest.approx(100 * (1 - mine / base))
    assert "vs baseline:" in capsys.readouterr().out


def test_missing_baseline_is_a_user_error(tmp_path):
    from pfb_train.errors import UserError

    with pytest.raises(UserError, match="runtime.baseline"):
        run(load_config(None, [*TINY, f"runtime.baseline={tmp_path}/nope", f"runtime.output={tmp_path}"]))


# -- grouping and robust time, on run directories written by hand ------------------------------------


def fake_run(
    root,
    name,
    seed=0,
    epoch_seconds=(10.0, 10.0, 10.0),
    top1=80.0,
    method="pfb",
    ratio=0.5,
    class_counts=None,
    class_top1=None,
    **blocking,
):
    """A finished run directory as `pfb-train` writes it, with chosen numbers."""
    import json

    import yaml

    from pfb_train.config import Config

    path = root / name
    path.mkdir(parents=True)
    config = Config().to_dict()
    config["name"], config["runtime"]["seed"], config["runtime"]["output"] = name, seed, str(root)
    config["blocking"]["method"] = method
    if method != "none":
        config["blocking"][method].update(ratio=ratio, **blocking)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    blocked = 0.0 if method == "none" else ratio
    records = [
        {
            "epoch": e,
            "epoch_seconds": t,
            "top1": top1,
            "kept_fraction": 1 - blocked,
            "samples_blocked": int(100 * blocked),
            "class_kept_fraction": [1 - blocked] * 3,
            **({"val_class_top1": class_top1} if class_top1 else {}),
        }
        for e, t in enumerate(epoch_seconds)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "method": method,
        "ratio": ratio,
        "ratio_option": None if method == "none" else "ratio",
        "top1": top1,
        "blocked_fraction": blocked,
        "train_seconds": sum(epoch_seconds),
        "selection_seconds": 0.0,
        "world_size": 1,
        "train_class_counts": class_counts,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def test_rows_group_by_the_whole_config_and_are_labelled_by_what_differs(tmp_path):
    from pfb_train.report import report

    base = [fake_run(tmp_path, f"full{s}", seed=s, method="none", top1=80.0) for s in range(2)]
    kde = [fake_run(tmp_path, f"kde{s}", seed=s, top1=70.0 + s, estimator="kde") for s in range(2)]
    mlk = [
        fake_run(tmp_path, f"mlk{s}", seed=s, top1=60.0 + s, estimator="mean_log_kernel", noise=0.3) for s in range(2)
    ]
    rows = {r["label"]: r for r in report(kde + mlk, base, str(tmp_path / "rep"))["rows"]}
    assert set(rows) == {
        "full data",
        "pfb 0.5 (estimator=kde, noise=None)",
        "pfb 0.5 (estimator=mean_log_kernel, noise=0.3)",
    }
    assert rows["pfb 0.5 (estimator=kde, noise=None)"]["seeds"] == 2
    assert rows["pfb 0.5 (estimator=kde, noise=None)"]["top1"] == pytest.approx(70.5)
    assert rows["pfb 0.5 (estimator=mean_log_kernel, noise=0.3)"]["top1"] == pytest.approx(60.5)


def test_the_options_of_methods_a_run_did_not_use_do_not_split_its_seeds(tmp_path):
    """Two seeds of random blocking written by versions whose PFB defaults differed are one row."""
    import yaml

    from pfb_train.report import report

    base = [fake_run(tmp_path, "full0", method="none")]
    runs = [fake_run(tmp_path, f"random{s}", seed=s, method="random") for s in range(2)]
    config = yaml.safe_load((tmp_path / "random0" / "config.yaml").read_text())
    config["blocking"]["pfb"]["stratify"] = "label"  # another version's default, for a method this run did not use
    (tmp_path / "random0" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = report(runs, base, str(tmp_path / "rep"))["rows"]
    assert [(r["label"], r["seeds"]) for r in rows if r["label"] != "full data"] == [("random 0.5", 2)]


def test_runs_of_a_method_this_version_does_not_know_group_by_its_own_section(tmp_path):
    """A plug-in's runs (not installed where the report runs) are compared as written, its own section only."""
    import json

    import yaml

    from pfb_train.report import report

    base = [fake_run(tmp_path, "full0", method="none")]
    runs = [fake_run(tmp_path, f"plugin{s}", seed=s, method="random") for s in range(2)]
    for s, stratify in enumerate(("label", "percentile")):  # pfb defaults of two versions: not this run's method
        config = yaml.safe_load((tmp_path / f"plugin{s}" / "config.yaml").read_text())
        config["blocking"]["method"] = "share_plugin"
        config["blocking"]["share_plugin"] = config["blocking"].pop("random")
        config["blocking"]["pfb"]["stratify"] = stratify
        (tmp_path / f"plugin{s}" / "config.yaml").write_text(yaml.safe_dump(config))
        summary = json.loads((tmp_path / f"plugin{s}" / "summary.json").read_text())
        (tmp_path / f"plugin{s}" / "summary.json").write_text(json.dumps({**summary, "method": "share_plugin"}))
    rows = report(runs, base, str(tmp_path / "rep"))["rows"]
    assert [(r["label"], r["seeds"]) for r in rows if r["label"] != "full data"] == [("share_plugin 0.5", 2)]


def test_time_saved_ignores_one_stalled_epoch_of_one_seed(tmp_path):
    from pfb_train.report import report

    base = [fake_run(tmp_path, f"full{s}", seed=s, method="none", epoch_seconds=(10.0, 10.0, 10.0)) for s in range(3)]
    pfb = [fake_run(tmp_path, f"pfb{s}", seed=s, epoch_seconds=(6.0, 6.0, 600.0 if s == 1 else 6.0)) for s in range(3)]
    row = [r for r in report(pfb, base, str(tmp_path / "rep"))["rows"] if r["method"] == "pfb"][0]
    assert row["time_reduction_pct"] == pytest.approx(40.0)  # medians 6 + 6 + 6 against 30
    assert row["train_seconds"] == pytest.approx((18 + 612 + 18) / 3)  # the plain mean is kept beside it


def test_head_and_tail_accuracy_on_a_long_tailed_run(tmp_path):
    from pfb_train.report import report

    counts, per_class = [50, 40, 20, 5], [90.0, 80.0, 60.0, 20.0]
    base = [fake_run(tmp_path, "full", method="none", class_counts=counts, class_top1=per_class)]
    result = report([], base, str(tmp_path / "rep"))
    assert result["rows"][0]["top1_head"] == pytest.approx(85.0) and result["rows"][0]["top1_tail"] == pytest.approx(
        40.0
    )
    assert "head top-1 | tail top-1" in result["markdown"]


def test_class_heatmap_is_drawn_for_a_thousand_classes(tmp_path):
    import json

    from pfb_train.report import report

    base = [fake_run(tmp_path, "full", method="none")]
    run = fake_run(tmp_path, "pfb")
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    for m in metrics:
        m["class_kept_fraction"] = [(c % 7) / 7 for c in range(1000)]
    open(f"{run}/metrics.jsonl", "w").write("".join(json.dumps(m) + "\n" for m in metrics))
    plots = report([run], base, str(tmp_path / "rep"))["plots"]
    assert str(tmp_path / "rep" / "class_kept_fraction.png") in plots


def test_runs_logged_before_method_sections_group_with_runs_logged_after(tmp_path, upgrade_run_logs):
    """An earlier version's flat `blocking` section, rewritten by scripts/upgrade_run_logs.py, reads as today's
    pfb section with the options added since as they behaved then; other methods' sections are ignored."""
    import yaml

    from pfb_train.report import report

    base = [fake_run(tmp_path, "full0", method="none")]
    then = dict(stratify="none", score_scale=1.0, score_norm="batch")  # what runs did then
    new = fake_run(tmp_path, "new", seed=0, top1=70.0, centres=16, **then)
    old = fake_run(tmp_path, "old", seed=1, top1=72.0)
    config = yaml.safe_load((Path(old) / "config.yaml").read_text())
    pfb = config["blocking"].pop("pfb")
    for name in ("none", "random", "infobatch", "static_random"):
        config["blocking"].pop(name)
    flat = {
        **{
            k: v
            for k, v in pfb.items()  # the keys an earlier version wrote (no score_*, stratify, density, class_memory then)
            if k
            not in (
                "centres",
                "update_rate",
                "centre_weights",
                "score_scale",
                "score_norm",
                "stratify",
                "density",
                "class_memory",
            )
        },
        "centers": 16,
        "ema": pfb["update_rate"],
        "weights": pfb["centre_weights"],
        "delta": 0.5,
    }
    config["blocking"].update(flat)  # as an earlier version wrote it (delta: infobatch's, ignored for pfb)
    (Path(old) / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="'blocking.[a-z]+' is a flat key of an earlier version"):
        load_config(str(Path(old) / "config.yaml"))
    assert upgrade_run_logs.upgrade_run(Path(old)) and not upgrade_run_logs.upgrade_run(Path(old))  # once
    rows = report([new, old], base, str(tmp_path / "rep"))["rows"]
    pfb_rows = [r for r in rows if r["label"] != "full data"]
    assert len(pfb_rows) == 1 and pfb_rows[0]["seeds"] == 2 and pfb_rows[0]["top1"] == pytest.approx(71.0)


def test_report_refuses_unlike_or_repeated_runs(tmp_path, capsys):
    """The same directory twice is not two seeds; a run of another data set, model or image size than its
    baseline makes every delta meaningless; seeds are counted by runtime.seed, not by directories."""
    import yaml

    from pfb_train.errors import UserError
    from pfb_train.report import report

    base = fake_run(tmp_path, "full", method="none")
    pfb = fake_run(tmp_path, "pfb")
    copy = fake_run(tmp_path, "pfb-copy")  # the same setting and seed, in another directory
    other = fake_run(tmp_path, "digits", seed=1)
    config = yaml.safe_load((Path(other) / "config.yaml").read_text())
    config["data"]["dataset"] = "digits"
    (Path(other) / "config.yaml").write_text(yaml.safe_dump(config))
    cases = [
        ([pfb, pfb], [base], f"run directory {Path(pfb).resolve()} is given twice as RUN_DIR"),
        ([pfb], [base, base], "is given twice as --baseline"),
        ([other], [base], f"run {other} has data.dataset 'digits', the baseline {base} has 'synthetic'"),
        ([pfb, copy], [base], f"runs {pfb} and {copy} are one setting with the same runtime.seed 0"),
        ([pfb], [base, other], f"run {other} has data.dataset 'digits'"),
    ]
    for runs, baselines, message in cases:
        with pytest.raises(UserError) as error:
            report(runs, baselines, str(tmp_path / "rep"))
        assert message in str(error.value) and "\n" not in str(error.value)
    from pfb_train.cli import main

    assert main(["report", pfb, "--baseline", base, "--baseline", other, "--out", str(tmp_path / "rep")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
