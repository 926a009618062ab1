"""The training step, an epoch's running counts, and the evaluation pass. Knows the Selector interface, not
any method. train.py's loop calls `start_epoch`, `train_batch` per step and `epoch_statistics` at the end.

Statistics stay on the device during the epoch (no `.item()` per step); the host reads
them only every `log_every` steps for a shown progress bar and once at the end.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pfb_train import blocking
from pfb_train.budget import RunClock
from pfb_train.costs import StepCost
from pfb_train.data import set_loader_epoch
from pfb_train.data.missing import unreadable_index
from pfb_train.distributed import all_gather_objects, all_reduce_sum
from pfb_train.errors import TrainingStopped
from pfb_train.timing import PhaseTimer
from pfb_train.selection import Selector

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3


class UpdateScheduler(Protocol):
    """What the engine asks of timm's LR scheduler. The position is in optimizer updates and may be
    fractional (timm's schedules take any number, though its signature says int)."""

    def step_update(self, num_updates: float) -> None: ...


@dataclass(frozen=True)
class StepSettings:
    """How steps run: fixed for the whole run."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # None: float32
    label_smoothing: float = 0.0
    clip_grad: Optional[float] = None
    log_every: int = 50
    accum_steps: int = 1  # micro-batches per optimizer step (optim.accum_steps): train_step splits each batch
    updates_per_epoch: int = 1  # full-data optimizer steps per epoch: the LR schedule's unit
    step_cost: StepCost = StepCost()  # one step's compute in full-data steps (the cost model)
    clock: RunClock = RunClock(epochs=1)  # where the run is on its schedule, and when it ends (budget.py)
    check_finite: bool = True  # skip (and count) steps with non-finite gradients
    max_nonfinite: int = 10  # stop the run after this many in a row


@dataclass
class Optimization:
    """Everything around the model's update: optimizer, LR scheduler, gradient scaler, EMA, mixup. The
    optimizer, scaler and EMA are checkpointed; the LR follows from the config and the position."""

    optimizer: torch.optim.Optimizer
    scheduler: Optional[UpdateScheduler]  # timm scheduler (step_update per optimizer step) or None
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3] = None  # timm ModelEmaV3 of the (unwrapped) model, or None
    mixup: Optional[Mixup] = None  # timm Mixup or None
    backup: Optional["BufferBackup"] = None  # BatchNorm statistics before the step (the non-finite guard)


@dataclass(frozen=True)
class StepContext:
    """What every step of a run works with: the model it trains, the selector, how steps run, and the
    optimisation objects. Built once per run; `train_step` and `train_batch` take it whole."""

    model: nn.Module  # a BlockedModel, or DDP around one
    selector: Selector
    settings: StepSettings
    optimization: Optimization


class Batch(NamedTuple):
    """One batch on the training device, as a step takes it."""

    x: torch.Tensor  # (B, C, H, W) images
    y: torch.Tensor  # (B,) int64 classes, or (B, classes) float soft targets under mixup/cutmix
    indices: (
        torch.Tensor
    )  # (B,) int64 dataset indices; negative for an unreadable file's stand-in (missing.stand_in_index)


def autocast(settings: StepSettings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def per_sample_loss(logits, target, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy per row, float32; soft (mixup) targets already carry their smoothing."""
    if target.dtype.is_floating_point:
        return F.cross_entropy(logits.float(), target, reduction="none")
    return F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)


def prepare_epoch(
    selector, loader, epoch: int, resume: Optional[tuple] = None, position: Optional[float] = None
) -> float:
    """Hand the epoch to the selector and its subset (if any) to the sampler; returns seconds spent.
    `resume`: (subset, rows done) of an interrupted epoch: the same subset, the done rows skipped.
    `position`: where the epoch starts on the run's schedule (Selector.set_epoch; None: `epoch`)."""
    started = time.perf_counter()
    selector.set_epoch(epoch, position)
    if resume is None:
        set_loader_epoch(loader, epoch, selector.epoch_indices(loader.sampler.size))
    else:
        set_loader_epoch(loader, epoch, *resume)
    return time.perf_counter() - started


class StepResult(NamedTuple):
    loss: torch.Tensor  # the loss that was optimised (weighted, if the method weights rows)
    kept: int  # rows through the deep part, stand-ins included: a shape, known on the host
    finite: bool
    loss_sum: torch.Tensor  # unweighted sum of the kept samples' losses: train_loss compares across methods
    labels: torch.Tensor  # (B,) class of every row; under mixup/cutmix the dominant one
    keep: Optional[torch.Tensor]  # kept row indices, or None when every row was kept
    present: torch.Tensor  # (B,) float64: 1 for a row that holds a sample, 0 for an unreadable file's stand-in
    kept_present: torch.Tensor  # the same for the kept rows
    split: bool  # the selection ran (the split model); else the plain model ran on every row


def train_step(
    batch: Batch, context: StepContext, schedule_at: Optional[float], timer: Optional[PhaseTimer] = None
) -> StepResult:
    """One optimizer step on the rows the selector keeps (blocking.forward / weighted_mean / observe:
    the same calls a loop of one's own makes), over `settings.accum_steps` micro-batches of the batch.

    Rows are blocked in each micro-batch. Each micro-batch's loss is the mean over its kept samples divided
    by accum_steps, so with equal kept counts (every micro-batch blocks the same number of rows; only the
    stand-ins of unreadable files differ) the step's gradient is that of the mean over all its kept rows:
    the unaccumulated step on the same rows. Under DDP gradients are all-reduced on the last micro-batch
    only (`no_sync` before). Without accumulation the selector observes the batch after the optimizer step;
    with it, each micro-batch right after its backward pass, as the Selector contract has it (observe follows
    its own select, before the next one), so a step later found non-finite has been observed.
    `schedule_at`: the LR schedule's position after this step, in full-data updates (None: the caller
    steps the schedule itself, as `train_batch` does once it knows the step's compute). A step whose
    gradients are not finite changes no weight (nor, without accumulation, the selector's state).
    `timer`: charges the step's time to the phases shallow, select, deep and observe."""
    model, selector, settings, optimization = context.model, context.selector, context.settings, context.optimization
    mark = None if timer is None else timer.mark
    guard = save_buffers(model, optimization, settings)  # before the forward changes BatchNorm statistics
    split = selector.blocks_rows()  # what blocking.forward asks too: whether the selection runs this step
    optimization.optimizer.zero_grad(set_to_none=True)
    parts = []
    for micro, last in micro_batches(batch, settings.accum_steps):
        with gradient_sync(model, last):
            with autocast(settings):
                blocked = blocking.forward(model, selector, micro.x, micro.y, micro.indices, mark=mark)
            losses = per_sample_loss(blocked.logits, blocked.targets, settings.label_smoothing)
            loss = blocking.weighted_mean(selector, blocked, losses)  # stand-ins (a negative index) weigh nothing
            if settings.accum_steps > 1:
                loss = loss / settings.accum_steps
            optimization.scaler.scale(loss).backward()
        parts.append((blocked, losses, loss.detach()))
        if settings.accum_steps > 1:  # before the next micro-batch's selection
            observe_marked(selector, blocked, losses, mark)
    finite = update(model, optimization, settings, schedule_at, guard)
    if finite and settings.accum_steps == 1:
        observe_marked(selector, blocked, losses, mark)
    elif mark is not None:
        mark("deep")
    return step_result(parts, finite, split)


def observe_marked(selector: Selector, blocked: blocking.BlockedBatch, losses: torch.Tensor, mark) -> None:
    """blocking.observe, the time before it charged to the deep part and its own to `observe` (`mark`: the
    phase timer's, or None)."""
    if mark is not None:
        mark("deep")
    blocking.observe(selector, blocked, losses)
    if mark is not None:
        mark("observe")


def micro_batches(batch: Batch, count: int):
    """(micro-batch, whether it is the last) for `count` equal slices of `batch` (views: no copy)."""
    if count == 1:
        yield batch, True
        return
    rows = batch.x.shape[0] // count
    for i in range(count):
        part = slice(i * rows, (i + 1) * rows)
        yield Batch(batch.x[part], batch.y[part], batch.indices[part]), i == count - 1


def gradient_sync(model, last: bool):
    """DDP's gradient all-reduce on the step's last micro-batch only (no_sync before it); a no-op without DDP."""
    if last or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def step_result(parts: list, finite: bool, split: bool) -> StepResult:
    """The step's StepResult from its micro-batches' (BlockedBatch, per-row losses, loss): counts summed,
    rows concatenated in batch order (kept row positions offset into the whole batch)."""
    results = []
    for blocked, losses, loss in parts:
        labels, present, kept_present = blocked.labels, blocked.present, blocked.kept_present  # computed once, there
        assert labels is not None and present is not None and kept_present is not None  # forward sets them
        present = present.double()
        kept_present = present if blocked.keep is None else kept_present.double()
        loss_sum = (losses.detach() * kept_present).sum()
        kept = blocked.logits.shape[0]
        results.append(StepResult(loss, kept, finite, loss_sum, labels, blocked.keep, present, kept_present, split))
    if len(results) == 1:
        return results[0]
    rows = results[0].labels.shape[0]
    keeps = [
        (torch.arange(rows, device=r.labels.device) if r.keep is None else r.keep) + i * rows
        for i, r in enumerate(results)
    ]
    return StepResult(
        torch.stack([r.loss for r in results]).sum(),
        sum(r.kept for r in results),
        finite,
        torch.stack([r.loss_sum for r in results]).sum(),
        torch.cat([r.labels for r in results]),
        None if all(r.keep is None for r in results) else torch.cat(keeps),
        torch.cat([r.present for r in results]),
        torch.cat([r.kept_present for r in results]),
        split,
    )


def save_buffers(model, optimization: Optimization, settings: StepSettings) -> bool:
    """The non-finite guard's first half: copy the BatchNorm statistics, so a step whose gradients turn
    out not finite can be undone. Returns whether the guard runs (fp16's scaler makes its own check)."""
    guard = settings.check_finite and not optimization.scaler.is_enabled()
    if guard:
        optimization.backup = optimization.backup or BufferBackup(model)
        optimization.backup.save()
    return guard


def update(
    model,
    optimization: Optimization,
    settings: StepSettings,
    schedule_at: Optional[float],
    guard: bool,
) -> bool:
    """After the step's backward passes: clip, optimizer step, LR schedule, EMA. Returns whether the gradients
    were finite (always True without the guard); a step that was not changes no weight and restores the
    BatchNorm statistics."""
    finite = True
    if settings.clip_grad is not None or guard:
        optimization.scaler.unscale_(optimization.optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # after DDP's all-reduce: the same on every rank
        if guard:
            finite = bool(torch.isfinite(norm))  # the step's one host sync (fp16's scaler makes its own)
            if not finite:  # the forward already folded this batch into the BatchNorm statistics
                assert optimization.backup is not None  # save_buffers made it: the guard runs
                optimization.backup.restore()
        if finite and settings.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, settings.clip_grad, norm)  # takes parameters, scales .grad
    if finite:
        optimization.scaler.step(optimization.optimizer)
    optimization.scaler.update()
    if optimization.scheduler is not None and schedule_at is not None:
        optimization.scheduler.step_update(num_updates=schedule_at)
    if finite and optimization.ema is not None:
        optimization.ema.update(getattr(model, "module", model))  # unwrap DDP: the EMA holds a plain copy
    return finite


class BufferBackup:
    """A copy of the model's buffers (BatchNorm statistics: small), so a non-finite step can be undone."""

    def __init__(self, model):
        self.buffers = list(model.buffers())
        self.copies = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)


class EpochTally:
    """Running totals of one epoch. Checkpointed mid-epoch, so a resumed epoch reports as a whole one."""

    # rows_seen / rows_kept count rows, stand-ins of unreadable files included (host counts, for the
    # progress bar); the epoch's statistics count samples, from class_rows, which leaves stand-ins out.
    FIELDS = (
        "batches",
        "rows_seen",
        "rows_kept",
        "nonfinite",
        "nonfinite_in_row",
        "elapsed",
        "extra_selection_seconds",
    )

    def __init__(
        self,
        device,
        num_classes: int,
        saved: Optional[dict] = None,
        order_done: int = 0,
        world_size: int = 1,
        nonfinite_in_row: int = 0,
        train_samples: int = 0,
        spent_before: tuple[float, float] = (0.0, 0.0),
        updates_per_epoch: int = 1,
    ):
        """`nonfinite_in_row`: the run's streak of non-finite steps when the epoch starts (it counts across
        epochs). `train_samples`: the training set's size, for the unreadable samples' indices.
        `spent_before`: (compute in full-data epochs, training seconds) of the run's earlier epochs;
        `updates_per_epoch`: full-data steps per epoch (a step's cost is counted in them)."""
        self.batches = self.rows_seen = self.rows_kept = self.nonfinite = 0
        self.nonfinite_in_row = nonfinite_in_row
        self.elapsed = self.extra_selection_seconds = 0.0
        # This epoch's steps in full-data steps (costs.StepCost), the same on every rank: summed in that unit,
        # full data's are whole numbers, so whole epochs of them add up exactly. Checkpointed once, not per
        # rank (resume.checkpoint_run), as the run's compute is one number.
        self.step_costs = 0.0
        self.compute_before, self.seconds_before = spent_before
        self.updates_per_epoch = updates_per_epoch
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)  # samples in loss_sum: finite steps only
        self.class_rows = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # samples seen, kept
        # 1 for each training sample that was unreadable this epoch (stand-ins name it: missing.stand_in_index)
        self.unreadable = torch.zeros(train_samples + 1, dtype=torch.uint8, device=device)  # + 1: a spare slot
        self.timer = PhaseTimer(device)
        if saved:
            for key in self.FIELDS:
                setattr(self, key, saved[key])
            self.loss_sum += saved["loss_sum"]
            self.loss_count += saved["loss_count"]
            self.class_rows += torch.tensor(saved["class_rows"], dtype=torch.float64, device=device)
            self.unreadable[torch.tensor(saved["unreadable"], dtype=torch.long, device=device)] = 1
            self.timer.seconds.update(saved["seconds"])
        # Where the epoch is, in samples of its order over all ranks (not batches: a resume may change
        # the batch size or the number of processes). `order_total`: set by the epoch's first batch.
        self.order_base, self.world_size, self.rows_at_start = order_done, world_size, self.rows_seen
        self.order_total = 0
        self.full_data_total = 0  # samples of a full-data epoch's order (a sampler-level subset visits fewer)
        # Set by `start` (engine.start_epoch): this process's steps of the epoch, and where they end.
        self.epoch = self.steps = self.last_batch = 0
        self.started = 0.0  # perf_counter at the epoch's start, less the time it took before a resume
        self.budget_spent = False  # the run's budget is spent (train_batch): the epoch ends at this step

    def start(self, epoch: int, batches: int, batch_size: int) -> None:
        """Start counting `batches` more steps of `batch_size` rows on this rank, for `epoch`."""
        self.epoch, self.steps, self.last_batch = epoch, 0, self.batches + batches
        self.order_total = self.order_done(batches * batch_size)  # every batch has this many rows (drop_last)
        self.full_data_total = self.updates_per_epoch * batch_size * self.world_size
        self.started = time.perf_counter() - self.elapsed
        self.timer.reset_clock()

    def at_last_batch(self) -> bool:
        """Whether the step just counted was the epoch's last (the same on every rank)."""
        return self.batches == self.last_batch

    def order_done(self, more_rows: int = 0) -> int:
        """Samples of the epoch's order trained on over all ranks, after `more_rows` more of this rank's."""
        return self.order_base + (self.rows_seen - self.rows_at_start + more_rows) * self.world_size

    def epoch_fraction(self, more_rows: int = 0) -> float:
        """How far the epoch is (0 to 1) once `more_rows` more rows of this rank are trained on."""
        return self.order_done(more_rows) / self.order_total

    def spent(self) -> tuple[float, float]:
        """(compute in full-data epochs, training seconds) of the run up to here (this rank's clock)."""
        return (
            self.compute_before + self.step_costs / self.updates_per_epoch,
            self.seconds_before + self.elapsed + self.extra_selection_seconds,
        )

    def add(self, result: StepResult, indices: torch.Tensor) -> None:
        """Count one step (no host sync: the counts stay on the device). `indices`: the batch's (B,) int64
        dataset indices, negative for the stand-ins of unreadable samples."""
        self.batches += 1
        self.rows_seen += result.labels.shape[0]
        self.rows_kept += result.kept
        if result.finite:
            self.nonfinite_in_row = 0
            self.loss_sum += result.loss_sum
            self.loss_count += result.kept_present.sum()
        else:
            self.nonfinite += 1
            self.nonfinite_in_row += 1
        kept = result.labels if result.keep is None else result.labels.index_select(0, result.keep)
        self.class_rows[0].index_add_(0, result.labels, result.present)
        self.class_rows[1].index_add_(0, kept, result.kept_present)
        spare = self.unreadable.shape[0] - 1  # readable rows mark the spare slot, so no row is filtered out
        self.unreadable.index_fill_(0, torch.where(indices < 0, unreadable_index(indices), spare), 1)

    def unreadable_indices(self) -> list[int]:
        """This rank's unreadable training samples of the epoch so far (dataset indices; a host read)."""
        return self.unreadable[:-1].nonzero().flatten().tolist()

    def state_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in self.FIELDS},
            "loss_sum": self.loss_sum.item(),
            "loss_count": self.loss_count.item(),
            "class_rows": self.class_rows.tolist(),
            "unreadable": self.unreadable_indices(),
            "seconds": self.timer.totals(),
        }

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """Several ranks' `state_dict`s as one (counts summed; steps and times as the slowest rank's),
        for a resume with another number of processes: the epoch's totals are sums over ranks."""
        merged = dict(states[0])
        for key in ("rows_seen", "rows_kept", "nonfinite", "loss_sum", "loss_count"):
            merged[key] = sum(s[key] for s in states)
        merged["unreadable"] = sorted({i for s in states for i in s["unreadable"]})
        for key in ("batches", "nonfinite_in_row", "elapsed", "extra_selection_seconds"):
            merged[key] = max(s[key] for s in states)
        merged["class_rows"] = torch.tensor([s["class_rows"] for s in states], dtype=torch.float64).sum(0).tolist()
        merged["seconds"] = {k: max(s["seconds"].get(k, 0.0) for s in states) for k in states[0]["seconds"]}
        return merged


def _split(values: list, head: int) -> tuple[list, tuple[list, list]]:
    """[head scalars..., a (2, C) table flattened] -> (the scalars, (first row, second row))."""
    table = values[head:]
    half = len(table) // 2
    return values[:head], (table[:half], table[half:])


def class_fractions(numerator: list, denominator: list, scale: float = 1.0) -> list:
    """Per-class ratio, rounded for the metrics file; None for a class with no rows."""
    return [round(scale * n / d, 4) if d > 0 else None for n, d in zip(numerator, denominator)]


def start_epoch(context: StepContext, tally: EpochTally, epoch: int, batches: int, batch_size: int) -> None:
    """Get the model and `tally` ready to train the rest of `epoch` (call `prepare_epoch` first): `batches`
    more steps of `batch_size` rows on this rank. An epoch resumed from the checkpoint of the step that spent
    the run's budget trains no more (`tally.budget_spent`; a fresh epoch trains: the run's end is decided at
    epoch ends, train.py). Collective where a resumed epoch's seconds budget is checked."""
    context.model.train()
    tally.start(epoch, batches, batch_size)
    if tally.order_base > 0:
        clock = context.settings.clock
        compute, seconds = tally.spent()
        tally.budget_spent = clock.budget_spent(compute, clock.seconds(seconds, 0, force=True))


def train_batch(context: StepContext, batch: Batch, tally: EpochTally) -> StepResult:
    """One step of the epoch `tally` counts (call `start_epoch` first): mixup, `train_step`, the step's counts
    and compute, then the LR schedule moved to the run's clock (budget.RunClock): the epoch's progress (a
    sampler-level subset's steps each count for more, so the schedule still ends on time), or under
    `schedule.budget` the share of it spent. Sets `tally.budget_spent` at the step where the budget is spent.

    `batch`: on the training device, in its memory format (the loaders': data/loaders.py). Raises
    TrainingStopped after `max_nonfinite` non-finite steps in a row (the same on every rank)."""
    settings, optimization, clock = context.settings, context.optimization, context.settings.clock
    x, y = batch.x, batch.y
    if optimization.mixup is not None:
        x, y = optimization.mixup(x, y)
    tally.timer.mark("data")
    result = train_step(Batch(x, y, batch.indices), context, None, tally.timer)
    tally.add(result, batch.indices)
    tally.step_costs += settings.step_cost(x.shape[0], result.kept, result.split)
    if tally.nonfinite_in_row >= settings.max_nonfinite:  # the same on every rank: the norm is all-reduced
        raise TrainingStopped(
            f"{tally.nonfinite_in_row} non-finite losses in a row (epoch {tally.epoch}, batch "
            f"{tally.batches}): {nonfinite_advice(settings, optimization)}"
        )
    tally.elapsed = time.perf_counter() - tally.started
    tally.steps += 1
    compute, seconds = tally.spent()
    seconds = clock.seconds(seconds, tally.steps, force=tally.at_last_batch())
    if optimization.scheduler is not None:
        at = clock.position(tally.epoch + tally.epoch_fraction(), compute, seconds)
        optimization.scheduler.step_update(num_updates=settings.updates_per_epoch * at)
    tally.budget_spent = clock.budget_spent(compute, seconds)
    return result


def epoch_statistics(context: StepContext, tally: EpochTally) -> dict:
    """The statistics of the epoch `tally` counted, summed over ranks (collective: the one read back of the
    epoch). Raises TrainingStopped for a non-finite loss total (runs without the per-step guard)."""
    settings = context.settings
    host = torch.tensor([tally.rows_seen, tally.nonfinite], dtype=torch.float64)
    counts = all_reduce_sum(
        torch.cat(
            [torch.stack([tally.loss_sum, tally.loss_count]), host.to(settings.device), tally.class_rows.flatten()]
        )
    )
    (loss_total, loss_count, rows, nonfinite), (seen_by_class, kept_by_class) = _split(counts.tolist(), 4)
    seen, kept = sum(seen_by_class), sum(kept_by_class)  # samples: stand-ins of unreadable files left out
    bad = rows - seen
    if not math.isfinite(loss_total):  # without the per-step guard (runtime.check_finite false, or fp16)
        raise TrainingStopped(
            f"the training loss of epoch {tally.epoch} is not finite: "
            f"{nonfinite_advice(settings, context.optimization)}"
        )
    unreadable = all_gather_objects(tally.unreadable_indices()) if bad else []  # collective: `bad` is all-reduced
    diagnostics = context.selector.epoch_diagnostics(settings.device)  # collective: every rank reads its tallies
    t = tally.timer.totals()
    seconds = time.perf_counter() - tally.started
    return {
        "compute": tally.spent()[0],  # full-data epochs of compute, the run's so far
        # unweighted mean over the kept samples of the steps that updated; None: no step did
        "train_loss": loss_total / loss_count if loss_count else None,
        "samples_seen": round(seen),
        "samples_kept": round(kept),
        "bad_samples": round(bad),
        "nonfinite_steps": int(nonfinite),
        "epoch_seconds": seconds + tally.extra_selection_seconds,
        "data_seconds": t.get("data", 0.0),
        "shallow_seconds": t.get("shallow", 0.0) + t.get("select", 0.0),  # shallow forward + selection
        "deep_seconds": t.get("deep", 0.0) + t.get("observe", 0.0),  # deep forward, backward, step, observe
        "selection_seconds": t.get("select", 0.0) + t.get("observe", 0.0) + tally.extra_selection_seconds,
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
        "class_kept_fraction": class_fractions(kept_by_class, seen_by_class),  # of each class's rows loaded
        "class_rows": [round(n) for n in seen_by_class],  # samples of each class loaded: the starvation evidence
        "unreadable": sorted({i for rank in unreadable for i in rank}),  # dataset indices (train.py names them)
        **diagnostics,
    }


def kept_fraction(kept: float, nominal: float, bad: float = 0) -> float:
    """The one definition of "kept", everywhere (epoch records, summary, progress bar): samples that went
    through the deep part and the backward pass, over the readable sample slots of full-data epochs
    (`nominal` slots, `bad` of them unreadable: a stand-in is neither kept nor blocked)."""
    readable = nominal - bad
    return kept / readable if readable > 0 else 0.0


def kept_so_far(tally: EpochTally) -> float:
    """`kept_fraction` of the epoch so far, from this rank's host counts (no device read): the rows it kept
    over the full-data slots its rows stand for (a sampler-level subset stands for more). The stand-ins of
    unreadable files count as kept rows here: they are told apart when the epoch ends."""
    return kept_fraction(tally.rows_kept * tally.order_total / tally.full_data_total, tally.rows_seen)


def nonfinite_advice(settings: StepSettings, optimization: Optimization) -> str:
    """What could change a non-finite loss under the run's settings, for the stop line: no advice to set
    what is already set, nor what the run's precision ignores (fp16's gradient scaler decides its skips
    itself, so runtime.check_finite does nothing there)."""
    fp16 = optimization.scaler.is_enabled()
    steps = ["lower optim.lr"]
    if settings.clip_grad is None:
        steps.append("set optim.clip_grad")
    if fp16:
        steps.append("set runtime.amp=bf16 (fp16 overflows above 65504)")
    elif not settings.check_finite:
        steps.append("set runtime.check_finite=true to skip such steps")
    return f"{', '.join(steps)}, or check the data"


@torch.no_grad()
def evaluate(model, loader, settings: StepSettings) -> dict:
    """Top-1/top-5 of the full model over every validation sample (counts summed over ranks).

    `model`: a BlockedModel or DDP around one. The forward runs the plain module: DDP's forward
    broadcasts buffers, a collective that a rank with fewer batches (or none) would never join. The one
    collective here, the final sum, every rank reaches whatever its share of the samples."""
    model = getattr(model, "module", model)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=settings.device)  # correct1, correct5, loss, samples
    # (2, classes): top-1 hits and samples per class; sized up front, as a rank may get no batch
    per_class = torch.zeros(2, model.num_classes, dtype=torch.float64, device=settings.device)
    for x, y, indices in loader:  # on the device, in its memory format (the loaders')
        present = blocking.holds_sample(indices).double()  # stand-ins of unreadable files: 0
        with autocast(settings):
            logits = model(x).logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y.unsqueeze(1)).double() * present.unsqueeze(1)
        losses = F.cross_entropy(logits, y, reduction="none").double() * present
        totals += torch.stack([hits[:, 0].sum(), hits.sum(), losses.sum(), present.sum()])
        per_class[0].index_add_(0, y, hits[:, 0])
        per_class[1].index_add_(0, y, present)
    totals = all_reduce_sum(torch.cat([totals, per_class.flatten()]))
    (correct1, correct5, loss, count), (hits, samples) = _split(totals.tolist(), 4)
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "val_loss": loss / count,
        "val_samples": round(count),
        "val_class_top1": class_fractions(hits, samples, scale=100.0),
    }
