"""The contract every registered selection method meets, checked for each one the registry lists.

A method that passes these needs nothing outside its own module: the last tests register a toy
method defined here and train it through the CLI, and load one through the entry point group.
"""

import copy
import dataclasses
import importlib.metadata
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics
from pfb_train.models import split_model
from pfb_train.selection import Method, Selector, build_selector, methods, register, unregister
from pfb_train import plugins
from pfb_train.selection import registry
from pfb_train.train import fit, setup
from helpers import BATCH, CLASSES, EPOCHS, METHODS, SAMPLES, VARIANTS, assert_equal, HostReads, overrides

HERE = Path(__file__).resolve().parent


def train(method, tmp_path, name, resume=False, **until):
    extra = ["runtime.resume=auto"] if resume else []
    state = setup(load_config(None, [*overrides(method, tmp_path, name), *extra]), DistInfo())
    summary = fit(state, **until)
    return state, summary


def shared(state: dict) -> dict:
    """A selector's state without its random generators (those are per rank and per device)."""
    return {k: v for k, v in state.items() if k != "generators"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of each method, trained once per module."""
    cache = {}

    def get(method):
        if method not in cache:
            state, summary = train(method, tmp_path_factory.mktemp(method), "whole")
            cache[method] = (state, summary)
        return cache[method]

    return get


@pytest.mark.parametrize(
    "until", [{"until_epoch": 1}, {"until_step": SAMPLES // BATCH + 3}], ids=["epoch_end", "inside_epoch"]
)
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(method, until, tmp_path, uninterrupted):
    whole, whole_summary = uninterrupted(method)
    first, stopped = train(method, tmp_path, "cut", **until)
    assert stopped is None  # it stopped early, after a checkpoint
    resumed, summary = train(method, tmp_path, "cut", resume=True)
    assert_equal(whole.net.state_dict(), resumed.net.state_dict(), "model")
    assert_equal(whole.selector.state_dict(), resumed.selector.state_dict(), "selector")
    assert summary["blocked_fraction"] == whole_summary["blocked_fraction"]
    assert [r["samples_seen"] for r in read_metrics(summary["run_dir"])] == [
        r["samples_seen"] for r in read_metrics(whole_summary["run_dir"])
    ]


@pytest.mark.parametrize("method", METHODS)
def test_realised_blocked_fraction_is_reported(method, uninterrupted):
    state, summary = uninterrupted(method)
    records = read_metrics(summary["run_dir"])
    nominal = SAMPLES // BATCH * BATCH
    dropped = sum(r["samples_blocked"] + r["samples_pruned"] for r in records)
    for r in records:
        assert r["samples_seen"] + r["samples_pruned"] == nominal
        kept = r["samples_seen"] - r["samples_blocked"]
        assert r["kept_fraction"] == pytest.approx(kept / nominal)
        assert r["blocked_fraction"] == pytest.approx((nominal - kept) / nominal)
    assert summary["blocked_fraction"] == pytest.approx(dropped / (nominal * len(records)))
    spec = methods()[VARIANTS[method][0]]
    if spec.ratio(state.cfg.blocking.chosen()) > 0:
        assert summary["blocked_fraction"] > 0  # a method with a ratio drops something
    else:
        assert summary["blocked_fraction"] == 0
    if spec.level == "batch":  # a fixed count per step while active: ranks never disagree on shapes
        per_step = round(spec.blocked_fraction_per_batch(state.cfg.blocking.chosen()) * BATCH)
        assert all(r["samples_blocked"] in (0, per_step * SAMPLES // BATCH) for r in records)


def _selector(variant: str, seed: int = 0) -> Selector:
    method, options = VARIANTS[variant]
    return build_selector(method, seed=seed, epochs=EPOCHS, batch_size=BATCH, num_classes=CLASSES, **options)


def _steps(selector: Selector, generator: torch.Generator, steps: int, epoch: int) -> list:
    """Drive a selector through the hooks the engine calls; returns what it decided."""
    decisions = []
    selector.set_epoch(epoch)
    decisions.append(selector.epoch_indices(SAMPLES))
    for _ in range(steps):
        feats = torch.randn(BATCH, 16, generator=generator)
        indices = torch.randperm(SAMPLES, generator=generator)[:BATCH]
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        keep = selector.select(feats, labels) if selector.blocks_rows() else None
        kept_idx, kept_labels = (indices, labels) if keep is None else (indices[keep], labels[keep])
        weights = selector.loss_weights(kept_idx)
        losses = torch.rand(len(kept_idx), generator=generator)
        selector.observe(feats if selector.needs_features() else None, keep, kept_idx, losses, kept_labels)
        decisions.append((keep, weights))
    return decisions


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_identically(method):
    a = _selector(method)
    _steps(a, torch.Generator().manual_seed(0), steps=4, epoch=1)
    b = _selector(method)  # a fresh object of the same configuration: the state dict carries the rest
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert_equal(a.state_dict(), b.state_dict())
    after_a = _steps(a, torch.Generator().manual_seed(1), steps=3, epoch=2)
    after_b = _steps(b, torch.Generator().manual_seed(1), steps=3, epoch=2)
    assert_equal(after_a, after_b, "decisions")
    assert_equal(a.state_dict(), b.state_dict(), "state")


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_never_read_device_values_back(method):
    torch.manual_seed(0)
    model = split_model(timm.create_model("resnet18", num_classes=CLASSES), stage=1, mode="recompute")
    selector = _selector(method)
    selector.set_epoch(1)
    selector.epoch_indices(SAMPLES)  # once per epoch, off the hot path
    settings = StepSettings(torch.device("cpu"), check_finite=False, clip_grad=1.0)
    optimization = Optimization(
        torch.optim.SGD(model.parameters(), lr=0.01), None, torch.amp.GradScaler("cpu", enabled=False)
    )
    context = StepContext(model, selector, settings, optimization)
    batch = Batch(torch.randn(BATCH, 3, 32, 32), torch.arange(BATCH) % CLASSES, torch.arange(BATCH))
    with HostReads() as reads:
        for step in range(3):  # the first step also initialises state (pfb's centres)
            train_step(batch, context, schedule_at=step + 1)
    assert reads.ops == []


@pytest.mark.distributed
def test_every_method_keeps_ranks_in_agreement_and_resumes_exactly_under_two_processes(tmp_path):
    """One torchrun job of 2 gloo processes trains every registered method in turn, through and with
    a stop inside its second epoch: each rank resumes its own random streams and tallies."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "methods_worker.py"),
        str(tmp_path),
        *METHODS,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in METHODS:
        r0, r1 = (torch.load(tmp_path / f"{method}_rank{r}.pt", weights_only=False) for r in range(2))
        assert_equal(r0["model"], r1["model"], f"{method} model")
        assert_equal(shared(r0["selector"]), shared(r1["selector"]), f"{method} selector")
        assert r0["summary"]["blocked_fraction"] == r1["summary"]["blocked_fraction"]
        records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert [r["samples_seen"] + r["samples_pruned"] for r in records] == [SAMPLES // BATCH * BATCH] * EPOCHS
        for rank, whole in enumerate((r0, r1)):
            resumed = torch.load(tmp_path / f"{method}_cut_rank{rank}.pt", weights_only=False)
            assert_equal(whole["model"], resumed["model"], f"{method} rank {rank} model")
            assert_equal(whole["selector"], resumed["selector"], f"{method} rank {rank} selector")  # generators too
        cut = [json.loads(line) for line in (tmp_path / f"{method}_cut" / "metrics.jsonl").read_text().splitlines()]
        assert [{k: v for k, v in r.items() if "second" not in k} for r in cut] == [
            {k: v for k, v in r.items() if "second" not in k} for r in records
        ], method


# ---------------------------------------------------------------- a method from outside the package


@dataclass
class KeepHeadOptions:
    keep_every: int = 2  # keep rows 0, k, 2k, ...

    def check(self, run, key):
        if self.keep_every < 2:
            raise UserError(f"config key '{key('keep_every')}' must be >= 2, got {self.keep_every}")


class KeepHead(Selector):
    """Blocks all rows but every k-th: deterministic, so the test knows the blocked count."""

    def __init__(self, keep_every: int, seed: int = 0):
        super().__init__(seed)
        self.keep_every = keep_every

    def blocks_rows(self) -> bool:
        return True

    def select(self, feats, labels=None):
        return torch.arange(0, feats.shape[0], self.keep_every, device=feats.device)


TOY = Method(
    "keep_head",
    level="batch",
    options=KeepHeadOptions,
    ratio_option=None,
    build=lambda o, run: KeepHead(o.keep_every, seed=run.seed),
    summary="a test's own method",
)


@pytest.fixture
def toy_method():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def test_a_method_defined_outside_the_package_trains_through_the_cli(toy_method, tmp_path, capsys):
    from pfb_train.cli import main

    args = [
        "--config",
        "demo",
        "--set",
        "blocking.method=keep_head",
        "--set",
        "blocking.keep_head.keep_every=4",
        "--set",
        "schedule.epochs=1",
        "--set",
        f"runtime.output={tmp_path}",
        "--set",
        "runtime.progress=false",
        "--set",
        "name=toy",
    ]
    assert main(args) == 0
    record = read_metrics(tmp_path / "toy")[0]
    assert record["samples_blocked"] == record["samples_seen"] * 3 // 4  # 16 of 64 rows kept per step
    assert main([*args[:-1], "name=toy2", "--set", "blocking.keep_head.keep_every=1"]) == 2
    assert "'blocking.keep_head.keep_every' must be >= 2" in capsys.readouterr().err
    assert main([*args[:-1], "name=toy3", "--set", "blocking.keep_head.ratio=0.3"]) == 2
    assert "is not an option of method 'keep_head' (its options: keep_every)" in capsys.readouterr().err


def test_a_plugin_registers_through_the_entry_point_group(monkeypatch, tmp_path):
    module = tmp_path / "toy_plugin.py"
    module.write_text(
        "import dataclasses\n\nfrom pfb_train.selection import register\nfrom test_methods_contract import TOY\n\n"
        "register(dataclasses.replace(TOY, name='plugged'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(name="plugged", value="toy_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry._REGISTRY, "loaded", False)
    try:
        assert "plugged" in methods()
        cfg = load_config(None, ["blocking.method=plugged", "blocking.plugged.keep_every=3"])
        assert dataclasses.asdict(cfg.blocking.chosen()) == {"keep_every": 3}
    finally:
        unregister("plugged")
