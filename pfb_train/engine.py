"""One training epoch and one evaluation pass. Knows the Selector interface, not any method.

Statistics stay on the device during the epoch (no `.item()` per step); the host reads
them only every `log_every` steps for the progress bar and once at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pfb_train.distributed import all_reduce_sum
from pfb_train.metrics import PhaseTimer


@dataclass
class StepContext:
    """What a step needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler (step_update per optimizer step) or None
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # None: float32
    channels_last: bool = False
    label_smoothing: float = 0.0
    clip_grad: Optional[float] = None
    mixup: object = None  # timm Mixup or None
    log_every: int = 50


def autocast(ctx: StepContext):
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype)


def per_sample_loss(logits, target, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy per row, float32; soft (mixup) targets already carry their smoothing."""
    if target.dtype.is_floating_point:
        return F.cross_entropy(logits.float(), target, reduction="none")
    return F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)


def _to_device(x, y, ctx: StepContext):
    x = x.to(ctx.device, non_blocking=True)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(ctx.device, non_blocking=True)


def train_step(model, selector, x, y, idx, ctx: StepContext, step: int, timer=None) -> tuple[torch.Tensor, int]:
    """One optimizer step on the rows the selector keeps; returns (loss, rows kept).

    `step` counts optimizer steps before this one (the LR schedule is stepped to step + 1)."""
    with autocast(ctx):
        out = model(x, select=selector.select, timer=timer)
    kept_idx = idx if out.keep is None else idx.index_select(0, out.keep)
    target = y if out.keep is None else y.index_select(0, out.keep)
    losses = per_sample_loss(out.logits, target, ctx.label_smoothing)
    weights = selector.loss_weights(kept_idx)
    loss = (losses * weights).mean() if weights is not None else losses.mean()

    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    if ctx.clip_grad is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    if ctx.scheduler is not None:
        ctx.scheduler.step_update(num_updates=step + 1)
    selector.observe(out.feats, out.keep, kept_idx, losses.detach())
    return loss.detach(), out.logits.shape[0]  # kept count is a shape, known on the host: no sync


def train_one_epoch(model, selector, loader, ctx: StepContext, epoch: int, step: int, progress=None) -> dict:
    """Train for one epoch; returns epoch statistics and the optimizer step count after it."""
    model.train()
    selector.set_epoch(epoch)
    timer = PhaseTimer(ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    rows_seen = rows_kept = 0
    started = time.perf_counter()
    for x, y, idx in loader:
        x, y = _to_device(x, y, ctx)
        idx = idx.to(ctx.device, non_blocking=True)
        if ctx.mixup is not None:
            x, y = ctx.mixup(x, y)
        timer.mark("data")

        loss, kept = train_step(model, selector, x, y, idx, ctx, step, timer)
        step += 1
        timer.mark("deep")

        loss_sum += loss * kept
        rows_seen += x.shape[0]
        rows_kept += kept
        if progress is not None:
            progress.update(1)
            if step % ctx.log_every == 0:
                elapsed = time.perf_counter() - started
                progress.set_postfix(loss=f"{loss.item():.3f}", kept=f"{rows_kept / rows_seen:.2f}",
                                     img_s=f"{rows_seen / elapsed:.0f}")

    totals = torch.tensor([loss_sum.item(), rows_seen, rows_kept], dtype=torch.float64, device=ctx.device)
    loss_total, seen, kept = all_reduce_sum(totals).tolist()
    phases = timer.totals()
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_total / max(kept, 1),
        "samples_seen": int(seen),
        "samples_blocked": int(seen - kept),
        "kept_fraction": kept / max(seen, 1),
        "epoch_seconds": seconds,
        "data_seconds": phases.get("data", 0.0),
        "shallow_seconds": phases.get("shallow", 0.0),
        "deep_seconds": phases.get("deep", 0.0),
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
        "step": step,
    }


@torch.no_grad()
def evaluate(model, loader, ctx: StepContext) -> dict:
    """Top-1/top-5 of the full model over every validation sample (counts summed over ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # correct1, correct5, loss, count
    for x, y, _ in loader:
        x, y = _to_device(x, y, ctx)
        with autocast(ctx):
            logits = model(x).logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.unsqueeze(1))
        totals += torch.stack([
            hits[:, :1].sum(), hits.sum(), F.cross_entropy(logits, y, reduction="sum"), torch.tensor(y.numel(), device=ctx.device)
        ]).double()
    correct1, correct5, loss, count = all_reduce_sum(totals).tolist()
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "val_loss": loss / count, "val_samples": int(count)}
