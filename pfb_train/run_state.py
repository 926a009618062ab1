"""One run's state between `train.setup` and `train.fit`: what stays fixed, the live objects, the position.

train.py builds it and trains from it; resume.py writes it into a checkpoint and reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from pfb_train.config import Config
from pfb_train.distributed import DistInfo
from pfb_train.engine import Optimization, StepSettings
from pfb_train.run_dir import BaselineComparison
from pfb_train.models import BlockedModel
from pfb_train.selection.score_pass import ScorePass
from pfb_train.selection import Selector


@dataclass(frozen=True)
class RunSettings:
    """What stays fixed for the whole run."""

    cfg: Config
    dist: DistInfo
    step_settings: StepSettings
    nominal_rows: int  # rows a full-data epoch trains on, over all ranks
    class_counts: Optional[tuple]  # training samples per class (None: the dataset does not say)
    train_samples: int  # size of the training set (a checkpoint holds it: per-sample state must fit)
    data_config: dict = field(default_factory=dict)  # timm's: input_size, mean, std of the model's input (export.py)


@dataclass
class Position:
    """Where the run is; `fit` goes on from `epoch` / `optimizer_steps`."""

    epoch: int = 0  # next epoch to train
    optimizer_steps: int = 0  # optimizer steps so far (the checkpoint's `step`)
    best_top1: float = float("-inf")
    history: list = field(default_factory=list)
    nonfinite_in_row: int = 0  # non-finite steps in a row up to here: the streak counts across epochs
    partial: Optional[dict] = None  # EpochTally state when resuming inside an epoch
    subset: Optional[torch.Tensor] = None  # that epoch's sampler subset


@dataclass
class RunState:
    """One run between `setup` and `fit`: its settings, the live objects, and its position."""

    settings: RunSettings
    net: BlockedModel  # the split model itself: checkpoints, EMA, state comparisons
    train_module: torch.nn.Module  # what the steps call: `net`, or DDP around it
    selector: Selector
    optimization: Optimization
    train_loader: DataLoader
    val_loader: DataLoader
    baseline: Optional[BaselineComparison] = None
    run_dir: Optional[Path] = None  # rank 0 only
    location: str = ""  # the run directory as every rank names it (messages)
    resume_option: str = "--resume auto"  # what continues this run (its directory, if auto would not find it)
    position: Position = field(default_factory=Position)
    mode_reason: str = ""  # why blocking.mode resolved to net.mode (the run line, summary.json)
    score: Optional[ScorePass] = None  # recompute mode's ranking pass, automatic parts resolved
    sample_name: Callable[[int], str] = str  # a training sample's index -> its file (messages)

    @property
    def cfg(self) -> Config:
        return self.settings.cfg
