"""What a checkpoint holds and the rules for going on from one (checkpoint.py does the atomic file I/O).

`CHECKPOINT_PARTS` lists every entry; `checkpoint_run` writes them, `restore` reads them back.
Before any work, `resume_point` finds the checkpoint and `check_resumable`, `refuse_finished` and
`check_position` refuse what it cannot be continued under.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, cast

import torch
import yaml

from pfb_train.budget import RunClock, spent_so_far
from pfb_train.calibrate import ModeChoice
from pfb_train.checkpoint import (
    all_rng_states,
    has_checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from pfb_train.config import Config, experiment_settings, flatten, step_rows
from pfb_train.data.loaders import ShardStreamSampler, TrainSampler
from pfb_train.distributed import DistInfo, all_gather_objects
from pfb_train.engine import EpochTally
from pfb_train.export import export_into_run
from pfb_train.errors import RunFinished, UserError
from pfb_train.run_state import RunState


def resume_point(resume: Optional[str], output: str, name: str):
    """(run directory, checkpoint) to continue from. `auto`: runs/<name>, fresh if it holds no checkpoint;
    a run directory or checkpoint file: must hold a readable checkpoint."""
    if resume is None:
        return None, None
    if resume == "auto":
        run_dir = Path(output).expanduser() / name
        checkpoint = latest_checkpoint(run_dir)[1]
        if checkpoint is None and has_checkpoint_files(run_dir):  # starting afresh would overwrite its metrics
            raise UserError(
                f"no checkpoint in {run_dir} is readable (checkpoint-last.pt and checkpoint-prev.pt): "
                "move the run directory away to start afresh, or give another name"
            )
        return run_dir, checkpoint
    path = Path(resume).expanduser()
    checkpoint = latest_checkpoint(path)[1] if path.is_dir() else load_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"cannot resume from {path}: no readable checkpoint there (runtime.resume)")
    return (path if path.is_dir() else path.parent), checkpoint


def resume_option(run_dir, output: str, name: str) -> str:
    """The --resume value that continues the run in `run_dir`: `auto` where it looks (runs/<name>), else
    the directory itself (a run started without --resume next to another of its name: runs/<name>-2)."""
    auto = Path(output).expanduser() / name
    return "--resume auto" if Path(run_dir).resolve() == auto.resolve() else f"--resume {run_dir}"


def unfinished_namesakes(run_dir: Path, name: str) -> list[Path]:
    """Run directories next to `run_dir` that make_run_dir gave to other runs named `name` (NAME-2,
    NAME-3, ...: their config.yaml says `name`, unlike a run named 'NAME-10') holding a checkpoint and no
    summary: runs of the same name, started without --resume, that did not finish."""
    if not run_dir.parent.is_dir():
        return []
    pattern = re.compile(re.escape(run_dir.name) + r"-[0-9]+")
    found = [
        p
        for p in run_dir.parent.iterdir()
        if pattern.fullmatch(p.name)
        and p.is_dir()
        and has_checkpoint_files(p)
        and not (p / "summary.json").exists()
        and _run_name(p) == name
    ]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def _run_name(run_dir: Path) -> Optional[str]:
    try:
        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


class Part(NamedTuple):
    """One entry of a checkpoint: how it is read from a run and put back into one."""

    key: str
    save: Callable  # (state) -> value
    load: Callable  # (state, value) -> None


def _load_ema(state: RunState, value) -> None:
    if state.optimization.ema is not None and value is not None:
        state.optimization.ema.load_state_dict(value)


def _set_position(name: str) -> Callable:
    return lambda state, value: setattr(state.position, name, value)


def _on_cpu(value):
    """`value` with every tensor in it (through dicts, lists and tuples) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _save_selector(state: RunState) -> dict:
    """The selector's state (rank 0's) and, under `per_rank`, every rank's `rank_local` entries (their
    tensors on the CPU, so any rank can read them). Collective."""
    selector = state.selector
    whole = selector.state_dict()
    mine = _on_cpu({k: whole[k] for k in selector.rank_local if k in whole})
    return {**whole, "per_rank": all_gather_objects(mine)}


def _load_selector(state: RunState, value: dict) -> None:
    """Each rank resumes its own random streams and tallies; with another number of processes they
    restart, rank 0 taking the merged tallies (`Selector.merge_rank_states`)."""
    per_rank = value["per_rank"]
    selector, dist = state.selector, state.settings.dist
    built = selector.state_dict()  # what this rank starts with where the checkpoint has nothing for it
    built = {k: built[k] for k in selector.rank_local if k in built}
    mine = (
        per_rank[dist.rank]
        if len(per_rank) == dist.world_size
        else (selector.merge_rank_states(per_rank) if dist.is_main else {})
    )
    shared = {k: v for k, v in value.items() if k != "per_rank" and k not in selector.rank_local}
    selector.load_state_dict({**shared, **built, **mine})


def _floating_buffers(module) -> dict:
    return {name: b.detach().cpu() for name, b in module.named_buffers() if b.is_floating_point()}


def _save_rank_buffers(state: RunState) -> Optional[list]:
    """Every rank's BatchNorm running statistics, and its EMA copy's. Collective. Under DDP each rank
    updates them from its own batches (DDP's broadcast from rank 0 comes at the next forward), so they
    differ after a step until the epoch end averages them, and every rank's EMA keeps its own mix."""
    if state.settings.dist.world_size == 1:
        return None
    ema = state.optimization.ema
    return all_gather_objects(
        {"model": _floating_buffers(state.net), "ema": _floating_buffers(ema.module) if ema is not None else None}
    )


def _load_rank_buffers(state: RunState, value: Optional[list]) -> None:
    """This rank's own buffers back (same number of processes only; otherwise rank 0's stay, from `model`)."""
    dist = state.settings.dist
    if value is None or len(value) != dist.world_size:
        return
    ema = state.optimization.ema
    for module, saved in (
        (state.net, value[dist.rank]["model"]),
        (ema.module if ema is not None else None, value[dist.rank]["ema"]),
    ):
        if module is not None and saved is not None:
            for name, tensor in saved.items():
                module.get_buffer(name).copy_(tensor)


def _restore_rng(state: RunState, value) -> None:
    if not restore_rng(value):
        print(
            "pfb-train: warning: the world size changed since the checkpoint; random streams restart", file=sys.stderr
        )


# Everything a checkpoint holds, in one list: `checkpoint_run` writes these keys and `restore` reads
# them back. `partial` and `subset` are set only by a checkpoint written inside an epoch.
CHECKPOINT_PARTS = (
    Part("model", lambda s: s.net.state_dict(), lambda s, v: s.net.load_state_dict(v)),
    Part(
        "optimizer",
        lambda s: s.optimization.optimizer.state_dict(),
        lambda s, v: s.optimization.optimizer.load_state_dict(v),
    ),
    Part("scaler", lambda s: s.optimization.scaler.state_dict(), lambda s, v: s.optimization.scaler.load_state_dict(v)),
    Part("ema", lambda s: s.optimization.ema.state_dict() if s.optimization.ema is not None else None, _load_ema),
    Part("rank_buffers", _save_rank_buffers, _load_rank_buffers),  # after model, ema: overrides rank 0's
    Part("selector", _save_selector, _load_selector),
    Part("blocking_mode", lambda s: s.net.mode, lambda s, v: None),  # read by checkpoint_mode, before the model runs
    Part("epoch", lambda s: s.position.epoch, _set_position("epoch")),
    Part("step", lambda s: s.position.optimizer_steps, _set_position("optimizer_steps")),
    Part("history", lambda s: s.position.history, _set_position("history")),
    Part(
        "nonfinite_in_row",
        lambda s: s.position.nonfinite_in_row,
        lambda s, v: setattr(s.position, "nonfinite_in_row", v or 0),
    ),  # the streak counts across epochs
    Part("best_top1", lambda s: s.position.best_top1, _set_position("best_top1")),
    Part("partial", lambda s: s.position.partial, _set_position("partial")),
    Part("subset", lambda s: s.position.subset, _set_position("subset")),
    Part("rng", lambda s: all_rng_states(), _restore_rng),
    Part("config", lambda s: s.cfg.to_dict(), lambda s, v: None),  # read by check_resumable, refuse_finished
    Part("train_samples", lambda s: s.settings.train_samples, lambda s, v: None),  # read by check_position
    Part("num_classes", lambda s: s.net.num_classes, lambda s, v: None),  # read by export.py
    Part("data_config", lambda s: s.settings.data_config, lambda s, v: None),  # read by export.py
)
# No scheduler entry: the LR is a function of the config and the position (epochs and fractions of one),
# so a resume with another batch size or number of processes follows the schedule the config describes.


# Settings a checkpoint cannot be continued under: its weights or its selector state would not fit.
MUST_MATCH = ("model.name", "model.num_classes", "model.cifar_stem", "blocking.method", "blocking.stage")


# What a checkpoint of this version holds that earlier versions' did not: they are refused in one line.
TALLY_KEYS = (*EpochTally.FIELDS, "loss_sum", "loss_count", "class_rows", "unreadable", "seconds")


def check_format(checkpoint: dict) -> None:
    """Refuse (UserError) a checkpoint written by an earlier version, naming what it lacks: every rank's
    selection state, or an interrupted epoch's per-rank tallies and compute."""
    partial = checkpoint.get("partial")
    lacks = [
        what
        for what, present in (
            ("every rank's selection state", "per_rank" in (checkpoint.get("selector") or {})),
            ("the interrupted epoch's per-rank tallies", partial is None or "ranks" in partial),
            ("the interrupted epoch's compute", partial is None or "step_costs" in partial),
            (
                "today's tally entries",
                partial is None or all(k in r for r in partial.get("ranks", []) for k in TALLY_KEYS),
            ),
        )
        if not present
    ]
    if lacks:
        raise UserError(
            f"cannot resume: the checkpoint was written by an earlier version of pfb-train ({'; '.join(lacks)} "
            "missing); go on with that version, or start a new run (name=...)"
        )


def check_resumable(cfg: Config, checkpoint: dict) -> None:
    """Refuse what this config cannot continue: a checkpoint of an earlier version, other weights or
    selection state (MUST_MATCH), or another clock (check_same_clock)."""
    check_format(checkpoint)
    saved, now = checkpoint.get("config", {}), cfg.to_dict()
    for key in MUST_MATCH:
        section, option = key.split(".")
        before, after = saved.get(section, {}).get(option), now[section][option]
        if option == "num_classes" and before is None:  # taken from the dataset: compared through the weights
            continue
        if before != after:
            raise UserError(
                f"cannot resume: the checkpoint was trained with {key} {before!r}, this config has "
                f"{after!r}; use another run name (name=...) to start a new run"
            )
    check_same_clock(saved.get("schedule", {}), now["schedule"])


def budget_name(schedule: dict) -> str:
    """'schedule.budget 6 epochs', or 'no schedule.budget', for messages."""
    if schedule.get("budget") is None:
        return "no schedule.budget"
    return f"schedule.budget {schedule['budget']:g} {schedule.get('budget_unit', 'epochs')}"


def check_same_clock(saved: dict, now: dict) -> None:
    """Refuse a resume that changes what the run's schedule is measured in (budget.RunClock): a budget added,
    dropped, or counted in another unit would move the LR and the windows to another point of the schedule.
    A budget raised or lowered in its own unit is a longer or shorter run, and goes on."""
    if (saved.get("budget") is None) == (now["budget"] is None) and (
        now["budget"] is None or saved.get("budget_unit", "epochs") == now["budget_unit"]
    ):
        return
    keep = (
        "set schedule.budget=null"
        if saved.get("budget") is None
        else f"set schedule.budget={saved['budget']:g} schedule.budget_unit={saved.get('budget_unit', 'epochs')}"
    )
    raise UserError(
        f"cannot resume: the checkpoint was trained with {budget_name(saved)}, this config has "
        f"{budget_name(now)}; {keep} to go on, or another run name (name=...) to start a new run"
    )


# Settings that change nothing about what is trained: a finished run relaunched with other values of
# these is the same run.
HOW_IT_RUNS = (
    "runtime.resume",
    "runtime.progress",
    "runtime.log_every",
    "runtime.threads",
    "runtime.output",
    "runtime.checkpoint_every",
    "runtime.baseline",
    "data.workers",
)


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'key before -> after' for every setting that differs between two configs' dicts (the methods'
    sections of the chosen method only), leaving out HOW_IT_RUNS."""
    before, after = flatten(experiment_settings(saved)), flatten(experiment_settings(now))
    keys = [k for k in dict.fromkeys([*before, *after]) if k not in HOW_IT_RUNS and before.get(k) != after.get(k)]
    return [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys]


def refuse_finished(cfg: Config, run_dir: Path, checkpoint: dict) -> None:
    """A run whose checkpoint ends its schedule is done: its files stay as they are. Raises RunFinished
    (exit 0) when relaunched as it was, UserError when relaunched with other settings, or when `--resume auto`
    found it finished while a run of the same name next to it is not (`unfinished_namesakes`): success
    would be reported for a run that was not continued."""
    done = checkpoint.get("epoch", 0)
    clock = RunClock(cfg.schedule.epochs, cfg.schedule.budget, cfg.schedule.budget_unit)
    if checkpoint.get("partial") is not None or not clock.ended(done, *spent_so_far(checkpoint.get("history", []))):
        return
    if cfg.runtime.resume == "auto":
        waiting = unfinished_namesakes(run_dir, cfg.name)
        if waiting:
            raise UserError(
                f"--resume auto found run {cfg.name} in {run_dir} finished, but {waiting[-1]} holds an "
                f"unfinished run of the same name (started without --resume): nothing trained; continue "
                f"it with --resume {waiting[-1]}"
            )
    evaluated = [r for r in checkpoint.get("history", []) if "top1" in r]
    epochs = f"{done} epoch{'s' if done != 1 else ''}" + (f", top-1 {evaluated[-1]['top1']:.2f}%" if evaluated else "")
    longer = (
        f"schedule.epochs={done + 10}"
        if cfg.schedule.budget is None
        else f"schedule.budget={cfg.schedule.budget * 1.5:g} (the schedule stretches over the new budget: the LR goes "
        "back up to where that puts the run)"
    )
    how = (
        f"nothing trained, no file written. To train longer: --resume auto --set {longer} (or more); to start "
        f"anew: another name (--set name=...) or move {run_dir} away"
    )
    changed = changed_settings(checkpoint.get("config", {}), cfg.to_dict())
    if changed:
        raise UserError(
            f"run {cfg.name} in {run_dir} finished its {epochs} with other settings "
            f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): {how}"
        )
    raise RunFinished(f"run {cfg.name} in {run_dir} is finished ({epochs}): {how}")


def check_position(state: RunState, checkpoint: dict) -> None:
    """Refuse what a resume cannot continue from: another training set (per-sample state, the epoch's
    order), or, inside an epoch of tar shards, another batch size or number of processes."""
    saved = checkpoint.get("train_samples")
    if saved is not None and saved != state.settings.train_samples:
        raise UserError(
            f"cannot resume: the checkpoint's training set held {saved} samples, this config gives "
            f"{state.settings.train_samples} (data.train_samples, data.root or the files there changed); "
            "use another run name (name=...) to start a new run"
        )
    partial = state.position.partial
    dist = state.settings.dist
    if partial is None or not isinstance(state.train_loader.sampler, ShardStreamSampler):
        return
    before, now = (partial["batch_size"], partial["world_size"]), (step_rows(state.cfg), dist.world_size)
    if before != now:
        raise UserError(
            f"cannot resume inside epoch {state.position.epoch} of tar shards with {now[0]} rows per step "
            f"(data.batch_size x optim.accum_steps) on {now[1]} process(es): it started with {before[0]} on {before[1]}, and each "
            "process reads its own part of the shards; resume with those to finish the epoch "
            "(epoch ends checkpoint too), then change them"
        )


def restore(state: RunState, checkpoint: dict) -> None:
    """Put a run back where `checkpoint` left it: weights, optimizer, selector, RNG, position. The LR
    schedule follows from the config and the position (no scheduler state is restored)."""
    for part in CHECKPOINT_PARTS:
        part.load(state, checkpoint.get(part.key))


def checkpoint_run(state: RunState, epoch: int, tally: Optional[EpochTally], best: bool = False) -> None:
    """Everything needed to go on exactly; `epoch` is the next epoch to start (tally None) or the one
    under way (tally: its progress). Collective (every rank's RNG state and tally); rank 0 writes."""
    position = state.position
    position.epoch = epoch
    position.partial = None
    if tally is not None:
        position.nonfinite_in_row = tally.nonfinite_in_row  # every rank's start, whatever rank_tally gives it
        dist = state.settings.dist
        position.partial = {
            "order_done": tally.order_done(),
            "batch_size": step_rows(state.cfg),  # rows per optimizer step on one process
            "world_size": dist.world_size,
            "ranks": all_gather_objects(tally.state_dict()),
            "step_costs": tally.step_costs,  # the epoch's compute so far, in full-data steps of
            "updates_per_epoch": tally.updates_per_epoch,
        }  # this many per epoch
    position.subset = cast(TrainSampler, state.train_loader.sampler).subset if tally is not None else None
    checkpoint = {part.key: part.save(state) for part in CHECKPOINT_PARTS}  # rank_buffers, selector, rng: collective
    position.partial = position.subset = None  # they describe the checkpoint, not the live run
    if not state.settings.dist.is_main:
        return
    if best:
        position.best_top1 = checkpoint["best_top1"] = position.history[-1]["top1"]
    assert state.run_dir is not None  # rank 0's, set by train.setup
    save_checkpoint(checkpoint, state.run_dir, best=best)
    if best:  # the best weights as a timm model too
        export_into_run(state.cfg, state.run_dir, "best", state.net.model, state.settings.data_config)


def checkpoint_mode(cfg: Config, checkpoint: dict) -> ModeChoice:
    """The blocking mode a resumed run goes on in: its checkpoint's (timing again could pick the other one).
    Raises UserError where the config sets the other mode."""
    mode = checkpoint["blocking_mode"]
    if cfg.blocking.mode not in ("auto", mode):
        raise UserError(
            f"cannot resume: the checkpoint was trained with blocking.mode {mode!r}, this config sets "
            f"{cfg.blocking.mode!r}; set blocking.mode auto (or {mode}) to go on"
        )
    return ModeChoice(mode, "as in the checkpoint", None)


def rank_tally(partial: Optional[dict], dist: DistInfo) -> Optional[dict]:
    """This rank's share of an interrupted epoch's tallies: its own under the same world size; with
    another one, rank 0 takes the sum of every saved rank's (the epoch's totals are summed over ranks)."""
    if partial is None:
        return None
    ranks = partial["ranks"]
    if len(ranks) == dist.world_size:
        return ranks[dist.rank]
    return EpochTally.merge(ranks) if dist.is_main else None


def partial_step_costs(partial: dict, updates_per_epoch: int) -> float:
    """An interrupted epoch's compute so far (EpochTally.step_costs) in full-data steps of `updates_per_epoch`
    per epoch: as saved under the same batch size and number of processes (bit for bit), rescaled otherwise."""
    saved = partial["updates_per_epoch"]
    if saved == updates_per_epoch:
        return partial["step_costs"]
    return partial["step_costs"] * updates_per_epoch / saved
