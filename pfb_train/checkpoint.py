"""Atomic checkpoints: write to a temporary file, fsync, rename. A crash never leaves a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def training_state(model, optimizer, scheduler, scaler, selector, epoch: int, step: int, config: dict,
                   ema=None) -> dict:
    return {
        "ema": ema.state_dict() if ema is not None else None,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict(),
        "selector": selector.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": config,
    }
