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
    updates_per_epoch: int = 1  # full-data optimizer steps per epoch: the LR schedule's unit
    ema: object = None  # timm ModelEmaV3 of the (unwrapped) model, or None


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


def begin_epoch(selector, loader, epoch: int) -> float:
    """Hand the epoch to the selector and its subset (if any) to the sampler; returns seconds spent."""
    started = time.perf_counter()
    selector.set_epoch(epoch)
    loader.sampler.set_epoch(epoch, selector.epoch_indices(loader.sampler.size))
    return time.perf_counter() - started


def train_step(model, selector, x, y, idx, ctx: StepContext, schedule_at: float, timer=None) -> tuple[torch.Tensor, int]:
    """One optimizer step on the rows the selector keeps; returns (loss, rows kept).

    `schedule_at`: the LR schedule's position after this step, in full-data updates."""
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
        ctx.scheduler.step_update(num_updates=schedule_at)
    if ctx.ema is not None:
        ctx.ema.update(getattr(model, "module", model))  # unwrap DDP: the EMA holds a plain copy
    if timer is not None:
        timer.mark("deep")
    selector.observe(out.feats, out.keep, kept_idx, losses.detach())
    if timer is not None:
        timer.mark("observe")
    return loss.detach(), out.logits.shape[0]  # kept count is a shape, known on the host: no sync


def train_one_epoch(model, selector, loader, ctx: StepContext, epoch: int, progress=None) -> dict:
    """Train for one epoch (call `begin_epoch` first); returns the epoch's statistics.

    Sampler-level selection shortens the epoch; the LR schedule then advances by epoch
    progress (full-data updates per epoch / steps this epoch), so it still ends on time."""
    model.train()
    timer = PhaseTimer(ctx.device)
    loss_sum = torch.zeros((), device=ctx.device)
    rows_seen = rows_kept = 0
    steps = len(loader)
    started = time.perf_counter()
    for i, (x, y, idx) in enumerate(loader):
        x, y = _to_device(x, y, ctx)
        idx = idx.to(ctx.device, non_blocking=True)
        if ctx.mixup is not None:
            x, y = ctx.mixup(x, y)
        timer.mark("data")
        schedule_at = ctx.updates_per_epoch * (epoch + (i + 1) / steps)
        loss, kept = train_step(model, selector, x, y, idx, ctx, schedule_at, timer)

        loss_sum += loss * kept
        rows_seen += x.shape[0]
        rows_kept += kept
        if progress is not None:
            progress.update(1)
            if (i + 1) % ctx.log_every == 0:
                elapsed = time.perf_counter() - started
                progress.set_postfix(loss=f"{loss.item():.3f}", kept=f"{rows_kept / rows_seen:.2f}",
                                     img_s=f"{rows_seen / elapsed:.0f}")

    totals = torch.tensor([loss_sum.item(), rows_seen, rows_kept], dtype=torch.float64, device=ctx.device)
    loss_total, seen, kept = all_reduce_sum(totals).tolist()
    t = timer.totals()
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_total / max(kept, 1),
        "samples_seen": int(seen),
        "samples_kept": int(kept),
        "epoch_seconds": seconds,
        "data_seconds": t.get("data", 0.0),
        "shallow_seconds": t.get("shallow", 0.0) + t.get("select", 0.0),  # shallow forward + selection
        "deep_seconds": t.get("deep", 0.0) + t.get("observe", 0.0),  # deep forward, backward, step, observe
        "selection_seconds": t.get("select", 0.0) + t.get("observe", 0.0),
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
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
