"""Multi-process training on CPU (gloo) through torchrun, as CI can run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.distributed

CONFIG = """
name: ddp
model: {name: test_resnet}
blocking: {method: pfb, pfb: {ratio: 0.25, start_epoch: 0, centres: 8, feature_dim: 16}}
data: {dataset: synthetic, img_size: 32, batch_size: 16, train_samples: 96, val_samples: 41,
       eval_batch_size: 8, workers: 0}
optim: {lr: 0.05}
schedule: {epochs: 2, warmup_epochs: 0}
runtime: {device: cpu, seed: 0, progress: false, threads: 1}
"""


def launch(tmp_path, nproc, fit, *overrides, timeout=300):
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG)
    out = tmp_path / f"out{nproc}"
    out.mkdir(exist_ok=True)  # a run to resume may be there
    args = [str(HERE / "ddp_worker.py"), str(config), str(out), "fit" if fit else "eval", *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)], result


def test_two_process_pfb_run_keeps_ranks_identical(tmp_path):
    (r0, r1), result = launch(tmp_path, 2, True)
    assert r0["world_size"] == 2
    for key in ("centres", "counts"):
        assert torch.equal(r0["selector"][key], r1["selector"][key]), key
    assert r0["selector"]["counts"].sum() > 0
    assert r0["model"].keys() == r1["model"].keys()
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    # both ranks blocked the same share; the metrics are reduced over ranks
    assert r0["summary"]["blocked_fraction"] == pytest.approx(4 / 16)
    metrics = (tmp_path / "out2" / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and '"samples_seen": 96' in metrics[0]
    for line in metrics:  # the selection's diagnostics are summed over ranks, then logged once
        record = json.loads(line)
        assert 0.0 <= record["selection_signal"] <= 1.0 and len(record["class_kept_fraction"]) == 10
    assert not (tmp_path / "out2" / "runs" / "ddp-2").exists()  # only rank 0 writes a run directory
    assert result.stdout.count("done: top-1") == 1  # only rank 0 prints


def test_degenerate_sizes_clipping_and_the_ema_under_two_processes(tmp_path):
    """One validation sample for two ranks (rank 1 has no evaluation batch: it used to hang the job in the
    evaluation forward's buffer broadcast); clipping under DDP; each rank's EMA BatchNorm statistics
    averaged at the epoch end, so `top1_ema` and the saved EMA are every rank's."""
    (r0, r1), _ = launch(
        tmp_path, 2, True, "data.val_samples=1", "optim.clip_grad=0.01", "optim.ema_decay=0.5", timeout=120
    )
    metrics = [
        json.loads(line) for line in (tmp_path / "out2" / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["val_samples"] for m in metrics] == [1, 1] and all("top1_ema" in m for m in metrics)
    assert r0["grad_norm"] == pytest.approx(0.01, rel=1e-4) and r1["grad_norm"] == pytest.approx(0.01, rel=1e-4)
    assert r0["ema_buffers"].keys() == r1["ema_buffers"].keys() and r0["ema_buffers"]
    for name, value in r0["ema_buffers"].items():
        assert torch.equal(value, r1["ema_buffers"][name]), name


def test_validation_counts_every_sample_once_on_any_world_size(tmp_path):
    (single,), _ = launch(tmp_path, 1, False)
    (r0, r1), _ = launch(tmp_path, 2, False)
    assert single["initial_eval"]["val_samples"] == 41
    assert r0["initial_eval"] == r1["initial_eval"]  # reduced over ranks
    assert r0["initial_eval"]["val_samples"] == 41  # 21 + 20: no padding, no drop
    assert r0["initial_eval"]["top1"] == pytest.approx(single["initial_eval"]["top1"])
    assert r0["initial_eval"]["top5"] == pytest.approx(single["initial_eval"]["top5"])
    assert r0["initial_eval"]["val_class_top1"] == pytest.approx(single["initial_eval"]["val_class_top1"])


def test_two_process_infobatch_scores_are_gathered_from_every_rank(tmp_path):
    (r0, r1), _ = launch(
        tmp_path,
        2,
        True,
        "blocking.method=infobatch",
        "blocking.pfb.ratio=0.5",
        "blocking.random.ratio=0.5",
        "blocking.infobatch.prune_ratio=0.5",
        "blocking.static_random.drop_fraction=0.5",
        "schedule.epochs=3",
    )
    scores0, scores1 = r0["selector"]["scores"], r1["selector"]["scores"]
    assert torch.equal(scores0, scores1)
    assert (scores0 != 3.0).all()  # every sample's loss reached both ranks in epoch 0
    assert r0["summary"]["blocked_fraction"] == r1["summary"]["blocked_fraction"] > 0
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name


def test_two_processes_end_a_seconds_budget_at_the_same_step(tmp_path):
    """Each rank's clock runs on its own: the ranks agree on the time every runtime.log_every steps, so both
    stop at one step (a disagreement would hang a collective) with identical weights and LR."""
    (r0, r1), _ = launch(
        tmp_path,
        2,
        True,
        "schedule.budget_unit=seconds",
        "schedule.budget=2",
        "schedule.epochs=1000",
        "runtime.log_every=2",
        timeout=120,
    )
    assert r0["summary"]["epochs"] == r1["summary"]["epochs"] < 1000
    last = json.loads((tmp_path / "out2" / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["seconds_spent"] >= 2 and "top1" in last  # the slowest rank's time
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name


def test_a_budgeted_run_resumed_inside_an_epoch_on_two_processes_counts_one_compute(tmp_path):
    """Stopped inside epoch 1 on one process, resumed on two: rank 0 takes the merged tally, rank 1 none, and
    both still count the epoch's compute so far (it is checkpointed once), so they stop at the same step."""
    from pfb_train.config import load_config
    from pfb_train.distributed import DistInfo
    from pfb_train.train import fit, setup

    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG)
    budget = ["blocking.method=none", "schedule.budget=2.5", "schedule.epochs=4", "runtime.checkpoint_every=3"]
    first = setup(load_config(str(config), [*budget, f"runtime.output={tmp_path}/out2/runs"]), DistInfo())
    fit(first, until_step=9)  # 3 of epoch 1's 6 steps of 16
    (r0, r1), _ = launch(tmp_path, 2, True, *budget, "runtime.resume=auto", timeout=120)
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    records = [
        json.loads(line) for line in (tmp_path / "out2" / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[1]["compute"] == pytest.approx(1 + 3 / 6 + 1 / 3)  # then the other 48: 1 step of 2 x 16 (of 3)
    assert 2.5 - 1e-9 <= r0["summary"]["compute_spent"] < 2.5 + 1 / 3


def test_two_processes_accumulating_keep_identical_weights(tmp_path):
    """optim.accum_steps under DDP: no gradient all-reduce before the step's last micro-batch (no_sync), the
    same weights on every rank after it."""
    (r0, r1), result = launch(tmp_path, 2, True, "optim.accum_steps=2", "data.batch_size=8")
    assert r0["summary"]["blocked_fraction"] == pytest.approx(2 / 8)  # blocked per micro-batch of 8
    for name in r0["model"]:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    assert "3 steps per full-data epoch" in result.stdout  # 96 samples / (8 x 2 micro-batches x 2 processes)
