"""What a run reports: the run line's descriptions, each epoch's record and line, the summary.

train.py calls these; they compute nothing about training itself.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from pfb_train.config import Config, global_batch_words
from pfb_train.engine import kept_fraction
from pfb_train.models import BlockedModel
from pfb_train.selection import get_method


def describe_data(cfg: Config, train_samples: int) -> str:
    """'synthetic (2048 training samples)', 'imagefolder /data/imagenet (1281167 training samples)'."""
    where = f" {cfg.data.root}" if cfg.data.root else ""
    return f"{cfg.data.dataset}{where} ({train_samples} training samples)"


def describe_budget(cfg: Config) -> str:
    """', budget 6 full-data epochs of compute' or ', budget 3600 training seconds' (nothing without one)."""
    s = cfg.schedule
    if s.budget is None:
        return ""
    unit = "full-data epochs of compute" if s.budget_unit == "epochs" else "training seconds"
    return f", budget {s.budget:g} {unit} (schedule.epochs {s.epochs} stretched over it)"


def ranking_pass(net: BlockedModel, score) -> str:
    """'; ranking pass at 0.5x, running statistics' in recompute mode (nothing in reuse: it has none)."""
    if net.mode != "recompute":
        return ""
    if score.scale == 0:
        return "; no ranking pass: the selection reads no features"
    return f"; ranking pass at {score.scale}x, {score.norm} statistics"


def describe_options(cfg: Config) -> str:
    """The chosen method and its ratio option, e.g. 'pfb ratio 0.4', 'infobatch prune_ratio 0.5', 'none'."""
    method = get_method(cfg.blocking.method)
    if not method.ratio_option:
        return method.name
    return f"{method.name} {method.ratio_option} {method.ratio(cfg.blocking.chosen())}"


def epoch_line(record: dict) -> str:
    """The line printed after each epoch, e.g. 'epoch 3: loss 1.2345  top-1 61.20%  kept 0.600  12.3s  830 img/s'."""
    top1 = f"top-1 {record['top1']:.2f}%" if "top1" in record else "top-1 -"
    loss = "-" if record["train_loss"] is None else f"{record['train_loss']:.4f}"  # None: no step updated
    line = (
        f"epoch {record['epoch']}: loss {loss}  {top1}  kept {record['kept_fraction']:.3f}  "
        f"{record['epoch_seconds']:.1f}s  {record['images_per_second']:.0f} img/s"
    )
    if record.get("selection_signal") is not None:
        line += f"  signal {record['selection_signal']:.2f}"
    if "epoch_fraction" in record:
        line += f"  (budget spent {record['epoch_fraction']:.2f} of the way through the epoch)"
    if "vs_baseline_top1" in record:
        line += f"  | vs baseline: {record['vs_baseline_top1']:+.2f} pts"
    if "vs_baseline_time_saved_pct" in record:
        line += f", {record['vs_baseline_time_saved_pct']:.1f}% less time"
    return line


STARVED_Z = 4.0  # how many binomial standard deviations below the mean a class must fall: not chance


def starved_classes(class_kept: list, class_rows: Optional[list] = None) -> dict:
    """The classes a selection starves in an epoch: kept fraction below half the mean over classes,
    by more than chance explains.

    `class_kept`: each class's kept fraction of its loaded rows (None: the class had no rows), as
    the epoch record's `class_kept_fraction`; `class_rows`: each class's loaded rows (None: no
    chance check). The mean is unweighted over the classes with rows, so a long tail counts as much
    as the head. With `class_rows`, a class of n rows also needs (mean - kept) * sqrt(n) above
    STARVED_Z binomial standard deviations sqrt(mean * (1 - mean)): at 1000 classes a class seen
    twice in an epoch keeps 0 of 2 by chance, and that is no starvation. Returns {class index as
    str: kept fraction} (JSON keys), empty when no class falls below."""
    present = [(c, f) for c, f in enumerate(class_kept) if f is not None]
    if not present:
        return {}
    mean = sum(f for _, f in present) / len(present)
    spread = math.sqrt(max(mean * (1 - mean), 0.0))

    def beyond_chance(c: int, f: float) -> bool:
        return class_rows is None or (mean - f) * math.sqrt(class_rows[c]) > STARVED_Z * spread

    return {str(c): f for c, f in present if f < 0.5 * mean and beyond_chance(c, f)}


WARNED_CLASSES = 10  # classes one warning line names


def starvation_warning(epoch: int, starved: dict, class_kept: list, cfg: Config) -> str:
    """One line naming the starved classes of an epoch (see `starved_classes`), with the remedy where
    the method has one."""
    present = [f for f in class_kept if f is not None]
    mean = sum(present) / len(present)
    named = list(starved.items())
    classes = ", ".join(f"class {c} kept {f:.2f}" for c, f in named[:WARNED_CLASSES])
    line = f"warning: epoch {epoch}: {classes} of its rows, under half the mean kept fraction {mean:.2f}"
    if len(named) > WARNED_CLASSES:  # the epoch record and summary.json list them all
        line += f"; {len(named) - WARNED_CLASSES} more classes too (the epoch record lists them)"
    if getattr(cfg.blocking.chosen(), "stratify", None) == "none":  # the method can stratify, and does not
        line += "; blocking.pfb.stratify=percentile (the default) keeps every class's share over time"
    return line


def unreadable_warning(epoch: int, names: list[str], listed) -> str:
    """The line for an epoch with unreadable training images: their count and first names; `listed`: the
    file holding every name (metrics.UNREADABLE_FILE)."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"warning: epoch {epoch}: {len(names)} unreadable training image(s), each stood in for by a readable "
        f"one of its batch and left out of every count: {shown} (all in {listed})"
    )


def no_step_line(cfg: Config, epoch: int, sampler, world_size: int) -> str:
    """The stop line of an epoch that trained no step: its sampler-level subset was under one global batch."""
    method = get_method(cfg.blocking.method)
    visited = sampler.size if sampler.subset is None else len(sampler.subset)
    return (
        f"epoch {epoch} trained no step: '{method.name}' left {visited} of the {sampler.size} training samples in "
        f"it, fewer than one global batch ({global_batch_words(cfg, world_size)}); "
        f"lower {method.ratio_key} or data.batch_size"
    )


def sample_accounting(seen: int, kept: int, bad: int, nominal: int) -> dict:
    """What happened to the sample slots of a full-data epoch: pruned by the sampler, blocked in the
    batch, kept (full forward and backward), or unreadable (`bad_samples`, counted in the epoch
    record). Methods are compared at equal blocked_fraction; unreadable files are neither: both
    fractions are of the readable slots (engine.kept_fraction), and add up to 1."""
    kept_part = kept_fraction(kept, nominal, bad)
    return {
        "samples_seen": seen,  # loaded and run through the shallow part
        "samples_pruned": nominal - seen - bad,  # never loaded this epoch (sampler-level selection)
        "samples_blocked": seen - kept,  # loaded, stopped after the shallow part
        "kept_fraction": kept_part,
        "blocked_fraction": 1.0 - kept_part if nominal > bad else 0.0,
    }


def summarize(
    cfg: Config,
    history: list[dict],
    wall_seconds: float,
    run_dir,
    world_size: int,
    device: str,
    class_counts: Optional[Sequence[int]] = None,
) -> dict:
    """summary.json: the run's totals over its epoch records (`history`), top-1 of the last evaluation."""
    slots = sum(r["samples_seen"] + r["samples_pruned"] for r in history)  # readable slots: see sample_accounting
    blocked = sum(r["samples_blocked"] + r["samples_pruned"] for r in history)
    evaluated = [r for r in history if "top1" in r]
    return {
        "name": cfg.name,
        "method": cfg.blocking.method,
        "ratio": get_method(cfg.blocking.method).ratio(cfg.blocking.chosen()),  # as the method's own option says
        "ratio_option": get_method(cfg.blocking.method).ratio_option,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "epochs": len(history),
        "top1": evaluated[-1]["top1"],
        "top5": evaluated[-1]["top5"],
        "best_top1": max(r["top1"] for r in evaluated),
        "blocked_fraction": blocked / max(slots, 1),  # of all sample-passes full data would make
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "compute_spent": history[-1]["compute"],  # full-data epochs of compute, by the cost model (costs.StepCost)
        "budget": cfg.schedule.budget,  # in budget_unit; None: the run trained schedule.epochs epochs
        "budget_unit": cfg.schedule.budget_unit if cfg.schedule.budget is not None else None,
        "selection_seconds": sum(r["selection_seconds"] for r in history),
        "bad_samples": sum(r["bad_samples"] for r in history),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in history),
        "world_size": world_size,
        "device": device,
        "wall_seconds": wall_seconds,
        # over whole epochs' worth: a budget's last epoch counts for the part of it that ran
        "seconds_per_epoch": sum(r["epoch_seconds"] for r in history)
        / sum(r.get("epoch_fraction", 1) for r in history),
        "run_dir": run_dir,
        # epochs where a class kept under half the mean kept fraction: [{epoch, classes: {class: kept}}]
        "starved_classes": [
            {"epoch": r["epoch"], "classes": r["starved_classes"]} for r in history if r.get("starved_classes")
        ],
        "train_class_counts": list(class_counts)
        if class_counts is not None
        else None,  # training samples per class (long-tailed sets: head vs tail)
    }
