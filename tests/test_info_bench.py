import json
import subprocess
import sys
from pathlib import Path

import pytest

from pfb_train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_split_share_and_predictions(capsys):
    assert (
        main(
            [
                "info",
                "--config",
                "demo",
                "--set",
                "model.name=resnet50",
                "--set",
                "data.img_size=224",
                "--set",
                "data.batch_size=10",
                "--set",
                "blocking.pfb.centres=8",
                "--set",
                "blocking.mode=recompute",
                "--json",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["stage_name"] == "layer1" and info["num_stages"] == 4
    assert info["shallow_share"] == pytest.approx(0.192, abs=0.001)
    assert info["blocked_rows"] == 4
    # the default ranking pass of a ResNet: half size, (s q^2 + 3 (1 - p)) / 3 with q = 0.5
    assert (info["score_scale"], info["score_norm"]) == (0.5, "running")
    assert info["predicted_ratio"]["recompute"] == pytest.approx((0.192 * 0.25 + 3 * 0.6) / 3, abs=0.001)
    assert info["params"] == info["shallow_params"] + info["deep_params"]
    assert main(["info", "--config", "demo"]) == 0
    text = capsys.readouterr().out
    assert "shallow share" in text and "<- blocking.mode" in text


def test_info_bad_model_is_one_line(capsys):
    assert main(["info", "--config", "demo", "--set", "model.name=levit_128s"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot split model 'levit_128s'" in err


@pytest.mark.slow  # runs a script as a process
def test_bench_step_prints_json_with_ratios():
    """The benchmark runs and reports; its timings are for docs/BENCHMARKS.md, not asserted here."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_step.py"),
        "--model",
        "resnet18",
        "--device",
        "cpu",
        "--img-size",
        "32",
        "--batch-size",
        "16",
        "--centres",
        "8",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--mode",
        "recompute",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("flop_ratio", "time_ratio", "predicted_ratio", "step_ms_none", "step_ms_pfb"):
        assert out[key] > 0, key
    assert out["blocked_rows"] == 6
    assert out["flop_ratio"] == pytest.approx(out["predicted_ratio"], rel=0.02)
    assert set(out["phase_ms"]) == {"shallow", "select", "deep", "observe"} and 0 < out["selection_share"] < 1


@pytest.mark.slow  # runs a script as a process
def test_bench_data_measures_every_layout_and_path_in_one_run():
    pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_data.py"),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--img-size",
        "32",
        "--warmup",
        "1",
        "--batches",
        "1",
        "--rounds",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["images"] == 8
    for layout in ("imagefolder", "hf", "wds"):
        for decode in ("cpu", "device"):
            assert out[f"images_per_second_{layout}_{decode}"][0] > 0
            assert out[f"worker_cpu_s_per_image_{layout}_{decode}"][0] >= 0
    assert 0 < out["augment_host_ms"] <= out["augment_ms"]


def _bench(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # stdout holds the JSON object only


@pytest.mark.slow  # runs a script as a process
def test_bench_reference_times_a_plain_loop():
    out = _bench(
        "bench_reference.py",
        "--model",
        "resnet18",
        "--device",
        "cpu",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--num-classes",
        "10",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--repeats",
        "2",
    )
    assert len(out["repeats_ms"]) == 2 and out["images_per_second"] == pytest.approx(4000 / out["step_ms"])


@pytest.mark.slow  # runs a script as a process
@pytest.mark.parametrize("data", [["--data", "synthetic"], ["--data", "jpeg", "--decode", "device"]])
def test_bench_train_runs_the_harness_for_both_methods(data):
    out = _bench(
        "bench_train.py",
        "--model",
        "resnet18",
        "--device",
        "cpu",
        "--img-size",
        "32",
        "--batch-size",
        "8",
        "--steps-per-epoch",
        "2",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--num-classes",
        "10",
        "--reference",
        *data,
    )
    assert out["none"]["blocked_fraction"] == 0 and out["pfb"]["blocked_fraction"] == 3 / 8
    assert len(out["pfb"]["epoch_seconds"]) == out["timed_epochs"] == 1
    assert out["time_ratio"] == pytest.approx(out["pfb"]["seconds"] / out["none"]["seconds"])
    assert out["baseline_vs_reference"] == pytest.approx(
        out["none"]["images_per_second"] / out["reference"]["images_per_second"]
    )


def _json_lines(script, *args) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow  # runs a script as a process
def test_selection_agreement_measures_signal_and_seed_agreement():
    rows = _json_lines(
        "selection_agreement.py",
        "--data",
        "digits",
        "--models",
        "resnet18",
        "--feature-dims",
        "32",
        "--batches",
        "3",
        "--batch-size",
        "64",
        "--centres",
        "16",
    )
    by_setting = {(r["estimator"], r["noise_form"], r["noise"]): r for r in rows}
    assert len(rows) == 7 and all(0.0 <= r["signal"] <= 1.0 and 0.0 <= r["seed_agreement"] <= 1.0 for r in rows)
    low, high = by_setting[("kde", "rank", 0.05)], by_setting[("kde", "rank", 0.5)]
    assert low["signal"] > high["signal"] and low["seed_agreement"] > high["seed_agreement"]


@pytest.mark.slow  # runs a script as a process
def test_paired_difference_pairs_runs_by_seed(tmp_path):
    for name, seed, top1, per_class in [
        ("random_r5", 0, 80.0, [70.0, 90.0]),
        ("random_r5", 1, 84.0, [80.0, 88.0]),
        ("pfb_r5", 0, 81.0, [72.0, 90.0]),
        ("pfb_r5", 1, 84.0, [78.0, 90.0]),
        ("pfb_r5", 2, 99.0, [99.0, 99.0]),
        ("full", 0, 90.0, [90.0, 90.0]),
    ]:
        run = tmp_path / f"{name}_s{seed}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"top1": top1}))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_class_top1": per_class}) + "\n")
    rows = _json_lines("paired_difference.py", str(tmp_path), "--reference", "random_r5", "--match", "_r5$")
    assert len(rows) == 1 and rows[0]["setting"] == "pfb_r5" and rows[0]["seeds"] == [0, 1]  # seed 2 has no pair
    assert rows[0]["top1_diff"] == pytest.approx(0.5) and rows[0]["top1_diff_std"] == pytest.approx(0.7071, abs=1e-3)
    assert rows[0]["class_top1_diff"] == [0.0, 1.0]


def test_methods_and_help_speak_the_config_language(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "blocking.pfb.noise = null" in out and "blocking.pfb.stratify = percentile" in out and "None" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "pfb-train --config CFG [--set KEY=VALUE ...] [--resume auto]" in " ".join(capsys.readouterr().out.split())
