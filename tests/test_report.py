import csv

import pytest

from pfb_train.config import load_config
from pfb_train.metrics import read_metrics
from pfb_train.train import run

TINY = ["model.name=resnet18", "data.dataset=synthetic", "data.img_size=32", "data.batch_size=16",
        "data.train_samples=96", "data.val_samples=32", "data.workers=0", "schedule.epochs=2",
        "schedule.warmup_epochs=0", "runtime.progress=false", "runtime.device=cpu", "blocking.centers=8",
        "blocking.ratio=0.25"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {"full0": ["blocking.method=none", "runtime.seed=0"],
                        "full1": ["blocking.method=none", "runtime.seed=1"],
                        "pfb": ["blocking.method=pfb"]}.items():
        made[name] = run(load_config(None, [*TINY, *extra, f"name={name}", f"runtime.output={out}"]))
    return made


def test_report_table_and_plots_match_the_runs(runs, cli, tmp_path):
    full0, full1, pfb = runs["full0"], runs["full1"], runs["pfb"]
    result = cli("report", pfb["run_dir"], "--baseline", full0["run_dir"], "--baseline", full1["run_dir"],
                 "--out", str(tmp_path / "rep"))
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
    base_hours = (full0["train_seconds"] + full1["train_seconds"]) / 2 / 3600
    assert float(row["time_reduction_pct"]) == pytest.approx(100 * (1 - pfb["train_seconds"] / 3600 / base_hours))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{pfb['top1']:.2f}" in md and "| pfb | 0.25 | 1 | 0.250 |" in md
    assert md in result.stdout
    for name in ("top1.png", "wallclock.png", "kept_fraction.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_unfinished_run_dir(cli, tmp_path):
    result = cli("report", str(tmp_path), "--baseline", str(tmp_path))
    assert result.returncode == 2 and "not a finished run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_live_comparison_with_a_baseline_run(runs, tmp_path, capsys):
    full = runs["full0"]
    summary = run(load_config(None, [*TINY, "blocking.method=pfb", f"runtime.baseline={full['run_dir']}",
                                     f"runtime.output={tmp_path}"]))
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
