"""Wire config -> data, model, selector, optimizer, schedule -> epochs -> run directory.

`setup` builds one run (a RunState, run_state.py), `fit` trains it epoch by epoch (engine.py), checkpoints
it (resume.py) and reports it (records.py, run_dir.py). This module only connects them.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence, cast

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pfb_train.calibrate import ModeChoice, resolve_mode
from pfb_train.config import Config, global_batch_words, peak_lr, save_config, step_rows
from pfb_train.budget import RunClock, spent_so_far
from pfb_train.costs import StepCost, blocking_mode, shallow_flop_share
from pfb_train.data import TrainSampler, build_datasets, build_loaders, dataset_labels
from pfb_train.data.splits import sample_namer, timm_data_config
from pfb_train.distributed import (
    DistInfo,
    all_gather_objects,
    announce_stop,
    barrier,
    cleanup,
    init_distributed,
    sharing_stops,
    stopped_elsewhere,
    watch_for_stops,
)
from pfb_train.engine import (
    Batch,
    EpochTally,
    Optimization,
    StepContext,
    StepResult,
    StepSettings,
    epoch_statistics,
    evaluate,
    kept_so_far,
    prepare_epoch,
    start_epoch,
    train_batch,
)
from pfb_train.export import export_into_run
from pfb_train.errors import Preempted, RunFinished, TrainingStopped, UserError, squeezed
from pfb_train.run_dir import UNREADABLE_FILE, BaselineComparison, RunLogger, make_run_dir, rewrite_metrics
from pfb_train.models import BlockedModel, build_model, check_score_pass, check_training_rows
from pfb_train.selection.score_pass import ScorePass
from pfb_train.preemption import PreemptionSignals
from pfb_train.records import (
    describe_budget,
    describe_data,
    describe_options,
    epoch_line,
    no_step_line,
    ranking_pass,
    sample_accounting,
    starvation_warning,
    starved_classes,
    summarize,
    unreadable_warning,
)
from pfb_train.resume import (
    changed_settings,
    checkpoint_mode,
    check_position,
    check_resumable,
    partial_step_costs,
    rank_tally,
    refuse_finished,
    restore,
    resume_option,
    resume_point,
    checkpoint_run,
)
from pfb_train.run_state import RunSettings, RunState
from pfb_train.seeding import derive_seed
from pfb_train.selection import get_method, selector_from_config

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed takes 32 bits
    torch.manual_seed(seed)


def run(cfg: Config) -> dict:
    """Train one run as configured; returns the summary written to summary.json."""
    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'runtime.device' is 'cuda' but no CUDA device is available")
    dist = init_distributed(cfg.runtime.device)
    watch_for_stops()
    clean = False
    try:
        summary = fit(setup(cfg, dist))
        assert summary is not None  # no until_epoch / until_step: fit trains to the end or raises
        clean = True
        return summary
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # frees the DDP model before its process group goes
        raise stop_every_rank(e) from None
    finally:
        cleanup(clean)


RUN_ENDING = {cls.__name__: cls for cls in (UserError, TrainingStopped)}


def stop_every_rank(error: BaseException) -> BaseException:
    """Under DDP one rank's error ends every rank with the same one-line message (distributed.py):
    a rank that failed itself announces it; a rank whose collective broke raises what was announced.
    Signals are already collective (preemption.py): every rank raises Preempted at the same step."""
    if isinstance(error, (Preempted, KeyboardInterrupt, RunFinished)) or not sharing_stops():
        return error
    announced = stopped_elsewhere(wait_seconds=0.0)
    if announced is None and isinstance(error, RuntimeError) and not isinstance(error, TrainingStopped):
        announced = stopped_elsewhere()  # likely a broken collective: the failing rank is writing why
    if announced is None:  # this rank failed first: say why, to every rank
        kind = type(error).__name__ if type(error).__name__ in RUN_ENDING else "TrainingStopped"
        message = str(error) if kind == type(error).__name__ else f"{type(error).__name__}: {error}"
        announced = announce_stop(kind, message)  # another rank's, if it announced first
        assert announced is not None  # sharing_stops(): the store gives the standing announcement
    kind, rank, message = announced
    return RUN_ENDING[kind](f"{message} (on rank {rank})")


def setup(cfg: Config, dist: DistInfo) -> RunState:
    """Everything a run needs before its first step, resumed from a checkpoint when runtime.resume says so."""
    rt = cfg.runtime
    baseline = BaselineComparison(rt.baseline) if rt.baseline else None  # a bad path fails before any work
    configure_backends(cfg, dist)
    seed_everything(rt.seed)  # the same initial model on every rank
    run_dir, checkpoint = open_checkpoint(cfg, dist)
    splits = build_datasets(cfg.data, cfg.model.num_classes, seed=rt.seed)
    loader_options = (dist.device.type == "cuda", dist.device, rt.channels_last, cfg.optim.accum_steps)
    train_loader, val_loader = build_loaders(splits, cfg.data, rt.seed, dist.rank, dist.world_size, *loader_options)
    net, score, mode = build_blocked_model(cfg, dist, splits.num_classes, checkpoint)
    step_cost = model_step_cost(cfg, net, score)  # before DDP and compile: FLOPs counted on the plain model
    ema = ModelEmaV3(net, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # a plain copy: before DDP
    seed_everything(derive_seed("rank", rt.seed, dist.rank))  # dropout, drop-path, mixup: each rank its own
    train_module = training_module(net, cfg, dist)
    selector = selector_from_config(cfg, splits.num_classes)
    check_epoch_size(cfg, selector.fewest_samples(len(splits.train)), len(splits.train), dist.world_size)
    optimization = build_optimization(cfg, net, ema, splits.num_classes, len(train_loader), dist)
    labels = dataset_labels(splits.train)
    class_counts = None if labels is None else tuple(torch.bincount(labels, minlength=splits.num_classes).tolist())
    settings = RunSettings(
        cfg,
        dist,
        step_settings(cfg, dist.device, step_cost, len(train_loader)),
        len(train_loader) * step_rows(cfg) * dist.world_size,
        class_counts,
        len(splits.train),
        timm_data_config(splits, net.in_chans, cfg.data.img_size),
    )
    state = RunState(
        settings,
        net,
        train_module,
        selector,
        optimization,
        train_loader,
        val_loader,
        baseline,
        mode_reason=mode.reason,
        score=score,
        sample_name=sample_namer(splits.train),  # messages name unreadable samples
    )
    if checkpoint is not None:
        restore(state, checkpoint)
        check_position(state, checkpoint)
    if dist.is_main:
        state.run_dir = run_dir or make_run_dir(rt.output, cfg.name)
        start_run_dir(state, describe_data(cfg, len(splits.train)), resumed=checkpoint is not None)
        print_notes(state, splits.notes, len(splits.train))
    state.location = str(all_gather_objects(str(state.run_dir) if dist.is_main else None)[0])
    state.resume_option = resume_option(state.location, rt.output, cfg.name)
    return state


def configure_backends(cfg: Config, dist: DistInfo) -> None:
    """Threads and CUDA math settings; refuses SyncBatchNorm off CUDA before any data or model is built."""
    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.sync_bn and dist.world_size > 1 and dist.device.type != "cuda":
        raise UserError(
            f"config key 'runtime.sync_bn' needs CUDA devices (SyncBatchNorm runs on GPUs only); this "
            f"run is on {dist.device.type}: set runtime.sync_bn=false"
        )
    if dist.device.type == "cuda":
        # Shapes are fixed per step (the kept count is too), so autotuned conv kernels are found
        # once and reused; TF32 runs float32 matmuls on tensor cores.
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
        precision = "tf32" if rt.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        # cudnn.conv lives on the module object torch swaps in at import (CudnnModule): mypy sees the plain module
        torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]


def open_checkpoint(cfg: Config, dist: DistInfo) -> tuple[Optional[Path], Optional[dict]]:
    """(run directory, checkpoint) that runtime.resume points at ((None, None): a new run). What cannot go
    on says so here, before any work (resume.check_resumable, refuse_finished)."""
    run_dir, checkpoint = resume_point(cfg.runtime.resume, cfg.runtime.output, cfg.name)
    if checkpoint is not None:
        check_resumable(cfg, checkpoint)
        refuse_finished(cfg, run_dir, checkpoint)
        changed = changed_settings(checkpoint.get("config", {}), cfg.to_dict())
        if changed and dist.is_main:  # e.g. a default that changed since the checkpoint was written
            print(f"note: resuming with settings other than the checkpoint's: {'; '.join(changed)}")
    return run_dir, checkpoint


def build_blocked_model(
    cfg: Config, dist: DistInfo, num_classes: int, checkpoint: Optional[dict]
) -> tuple[BlockedModel, ScorePass, ModeChoice]:
    """The split model on the run's device, its ranking pass and its blocking mode, decided once here: a
    resumed run's is its checkpoint's, a new run's is resolved (calibrate.resolve_mode). Everything after
    (the checks, the cost model, the steps) reads `net.mode`. Raises UserError for a ranking pass or a kept
    row count the model cannot train on."""
    rt, method = cfg.runtime, get_method(cfg.blocking.method)
    net = build_model(
        cfg.model,
        cfg.blocking.stage,
        num_classes,
        blocking_mode(cfg.blocking),
        sync_bn=rt.sync_bn and dist.world_size > 1,
        img_size=cfg.data.img_size,
    ).to(dist.device)
    if rt.channels_last:
        net = net.to(memory_format=torch.channels_last)
    options = cfg.blocking.chosen()
    score = check_score_pass(net, method.score_pass(options), cfg.data.img_size, f"blocking.{cfg.blocking.method}")
    mode = checkpoint_mode(cfg, checkpoint) if checkpoint is not None else resolve_mode(cfg, net, AMP_DTYPES[rt.amp])
    net.mode = mode.mode
    batch = cfg.data.batch_size
    kept = batch - round(method.blocked_fraction_per_batch(options) * batch)
    synced_ranks = dist.world_size if rt.sync_bn else 1
    check_training_rows(net, cfg.data.img_size, batch, kept, method.ratio_key, synced_ranks=synced_ranks)
    return net, score, mode


def training_module(net: BlockedModel, cfg: Config, dist: DistInfo) -> torch.nn.Module:
    """What the steps call: `net`, or DDP around it on several processes; compiled parts under runtime.compile
    (after DDP wrapping: DDP's hooks stay on the original parameters)."""
    module: torch.nn.Module = net
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        module = DistributedDataParallel(net, device_ids=device_ids)
    if cfg.runtime.compile:
        net.compile_parts()
    return module


def build_optimization(cfg: Config, net, ema, num_classes: int, updates_per_epoch: int, dist: DistInfo) -> Optimization:
    """timm's optimizer (its LR scaled to the global batch under optim.lr_base), LR scheduler (stepped per
    update) and Mixup, the gradient scaler, and `ema`."""
    o, s = cfg.optim, cfg.schedule
    lr = peak_lr(o, step_rows(cfg) * dist.world_size)
    try:  # a name timm lists may still need what this machine lacks (bitsandbytes, APEX, CUDA)
        optimizer = create_optimizer_v2(net, opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum)
    except (AssertionError, ImportError, ValueError, TypeError) as e:
        reason = squeezed(e, limit=1000) or type(e).__name__
        raise UserError(f"config key 'optim.name': timm cannot make optimizer '{o.name}' here ({reason})") from None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=s.name,
        num_epochs=s.epochs,
        warmup_epochs=s.warmup_epochs,
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.data.mixup,
            cutmix_alpha=cfg.data.cutmix,
            label_smoothing=o.label_smoothing,
            num_classes=num_classes,
        )
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.runtime.amp == "fp16")
    return Optimization(optimizer, scheduler, scaler, ema, mixup)


def model_step_cost(cfg: Config, net: BlockedModel, score: ScorePass) -> StepCost:
    """The cost model of one step of `net` in its mode (costs.StepCost): s, the shallow part's FLOP share,
    counted on one image of the plain (uncompiled) model; recompute mode pays for its ranking pass's scale."""
    shallow_share = shallow_flop_share(net, cfg.data.img_size, net.in_chans)
    assert score.scale is not None  # resolved (check_score_pass)
    return StepCost(net.mode, shallow_share, score.scale if net.mode == "recompute" else 1.0)


def step_settings(cfg: Config, device, step_cost: StepCost, updates_per_epoch: int) -> StepSettings:
    """How the run's steps go, and what each costs (`step_cost`, in full-data steps)."""
    rt, s = cfg.runtime, cfg.schedule
    return StepSettings(
        device,
        AMP_DTYPES[rt.amp],
        cfg.optim.label_smoothing,
        cfg.optim.clip_grad,
        rt.log_every,
        accum_steps=cfg.optim.accum_steps,
        updates_per_epoch=updates_per_epoch,
        check_finite=device.type != "cuda" if rt.check_finite is None else rt.check_finite,  # None: see config.py
        max_nonfinite=rt.max_nonfinite,
        step_cost=step_cost,
        clock=RunClock(s.epochs, s.budget, s.budget_unit, every=rt.log_every),
    )


def start_run_dir(state: RunState, data: str, resumed: bool) -> None:
    """Rank 0: the run directory with its config, metrics up to a resume's checkpoint, and the run line.
    `data`: the data's description; `resumed`: the run goes on from a checkpoint."""
    cfg, dist, net, run_dir = state.cfg, state.settings.dist, state.net, state.run_dir
    assert run_dir is not None  # rank 0's, set by setup
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # a finished run never gets here (refuse_finished)
    if cfg.runtime.resume is not None:  # the checkpoint's history is the truth: drop epochs logged after it
        rewrite_metrics(run_dir, state.position.history)
    print(
        f"run {cfg.name}: {cfg.model.name} on {data}, split after {net.stage_name} (stage {net.stage}), "
        f"blocking {describe_options(cfg)} (mode {net.mode}: {state.mode_reason}{ranking_pass(net, state.score)}), "
        f"{len(state.train_loader)} steps per full-data epoch{describe_budget(cfg)}, {dist.world_size} "
        f"process(es) on {dist.device.type} -> {state.run_dir}"
    )
    if resumed:
        print(f"resumed at epoch {state.position.epoch}, step {state.position.optimizer_steps}")


def print_notes(state: RunState, notes: Sequence[str], train_samples: int) -> None:
    """Rank 0: the data's notes, and settings that do something other than a reader may expect."""
    cfg, world_size = state.cfg, state.settings.dist.world_size
    o, s = cfg.optim, cfg.schedule
    global_batch = step_rows(cfg) * world_size
    lr = peak_lr(o, global_batch)
    if o.lr_base is not None:
        print(
            f"note: LR {lr:g}: optim.lr_base {o.lr_base:g} per {o.lr_base_size} samples x global batch {global_batch}"
        )
    for note in notes:
        print(note)
    left_out = train_samples - state.settings.nominal_rows
    if left_out > 0:  # equal whole batches on every rank; the rest is not silently lost, it rotates
        print(
            f"note: {left_out} of {train_samples} training samples sit out each epoch (less than one "
            f"global batch of {global_batch}); which ones changes every epoch"
        )
    start = getattr(cfg.blocking.chosen(), "start_epoch", 0)
    if start >= s.epochs:
        print(
            f"note: blocking.{cfg.blocking.method}.start_epoch {start} is not within schedule.epochs "
            f"{s.epochs}: this run trains on full data"
        )
    if s.warmup_epochs >= s.epochs:
        print(
            f"note: schedule.warmup_epochs {s.warmup_epochs} is not below schedule.epochs {s.epochs}: the whole "
            f"run is warm-up (the LR climbs from schedule.warmup_lr towards the peak LR {lr:g}) and the "
            f"{s.name} schedule never starts"
        )


def check_epoch_size(cfg: Config, fewest: int, train_samples: int, world_size: int) -> None:
    """Refuse a sampler-level selection that leaves an epoch fewer samples than one global batch (it would
    train no step): `fewest` is what the method says it may leave of `train_samples` (Selector.fewest_samples).
    A whole set under one global batch is build_loaders' error, found before."""
    if fewest >= step_rows(cfg) * world_size:
        return
    method = get_method(cfg.blocking.method)
    key = method.ratio_key
    raise UserError(
        f"config key '{key}' {method.ratio(cfg.blocking.chosen())} can leave an epoch {fewest} of the "
        f"{train_samples} training samples, fewer than one global batch ({global_batch_words(cfg, world_size)}): "
        f"such an epoch trains no step; lower {key} or data.batch_size"
    )


def fit(state: RunState, until_epoch: Optional[int] = None, until_step: Optional[int] = None) -> Optional[dict]:
    """Train from where `state` is to the configured number of epochs; log, checkpoint, summarise.

    `until_epoch` / `until_step` stop early (after a checkpoint) and return None, as a preempted
    job would; SIGTERM/SIGUSR1/SIGINT do the same and raise Preempted."""
    logger = RunLogger(state.run_dir, enabled=state.settings.dist.is_main)
    try:
        return _fit(state, logger, until_epoch, until_step)
    finally:
        logger.close()


def preempted(signum: int, where: str, state: RunState) -> Preempted:
    """The stop of a signalled run, its checkpoint written; `where`: e.g. 'at epoch 3, step 120'."""
    return Preempted(
        signum,
        f"stopped by {signal.Signals(signum).name} {where}; checkpoint saved in {state.location}; "
        f"run the same command with {state.resume_option} to continue",
    )


def _fit(state: RunState, logger: RunLogger, until_epoch, until_step) -> Optional[dict]:
    """The run's loop: epochs of steps, each step followed by the checkpoint and stop checks, each epoch by
    its record, evaluation and checkpoint (see `fit`)."""
    dist, rt, position = state.settings.dist, state.cfg.runtime, state.position
    context = StepContext(state.train_module, state.selector, state.settings.step_settings, state.optimization)
    wall_start = time.perf_counter() - (position.history[-1]["wall_seconds"] if position.history else 0.0)
    if ended_before(state):
        return finish(state, logger, wall_start)
    with PreemptionSignals(every=rt.log_every, device=dist.device, announce=dist.is_main) as signals:
        for epoch in itertools.count(position.epoch):
            if until_epoch is not None and epoch >= until_epoch:
                return None
            tally = begin_epoch(state, context, epoch)
            bar = progress_bar(state, epoch, tally)
            for x, y, indices in () if tally.budget_spent else state.train_loader:
                result = train_batch(context, Batch(x, y, indices), tally)
                position.optimizer_steps += 1
                show_progress(bar, tally, result, rt.log_every)
                steps = position.optimizer_steps
                # At the epoch's last step too: a signal is not left waiting through the evaluation.
                signum = signals.requested(steps, force=tally.at_last_batch())
                stop = signum or (until_step is not None and steps >= until_step)
                if stop or (rt.checkpoint_every and steps % rt.checkpoint_every == 0):
                    checkpoint_run(state, epoch, tally)
                if signum:
                    raise preempted(signum, f"at epoch {epoch}, step {steps}", state)
                if stop:  # rank 0 has written the checkpoint once every rank is here
                    bar.close()
                    barrier()
                    return None
                if tally.budget_spent:
                    break
            bar.close()
            last = end_epoch(state, context, tally, logger, wall_start)
            # A signal that came during the evaluation or the checkpoint: stop here, the epoch is saved.
            # After the last epoch the run ends as finished instead (its summary takes a moment).
            signum = signals.requested(position.optimizer_steps, force=True)
            if signum and not last:
                raise preempted(signum, f"after epoch {epoch}, step {position.optimizer_steps}", state)
            if signum and dist.is_main:
                print(f"note: {signal.Signals(signum).name} came as the last epoch ended: the run finishes", flush=True)
            if last:
                break
    return finish(state, logger, wall_start)


def ended_before(state: RunState) -> bool:
    """Whether a resumed run's end was reached before its checkpoint (a budget raised since goes on), so it
    trains no epoch. The run's end is otherwise decided once per epoch, at its end (`end_epoch`). A
    checkpoint's history is rank 0's, the same on every rank."""
    position = state.position
    clock = state.settings.step_settings.clock
    return position.partial is None and clock.ended(position.epoch, *spent_so_far(position.history))


def begin_epoch(state: RunState, context: StepContext, epoch: int) -> EpochTally:
    """The epoch's tally, its subset and order handed to the loader, and, for an epoch resumed from a
    checkpoint, its counts so far and this config's LR schedule from the first step on (not the saved LR)."""
    dist, position, step_settings = state.settings.dist, state.position, state.settings.step_settings
    partial = position.partial
    done = partial["order_done"] if partial is not None else 0
    compute, seconds = spent_so_far(position.history)  # by the epochs before this one
    tally = EpochTally(
        dist.device,
        state.net.num_classes,
        rank_tally(partial, dist),
        done,
        dist.world_size,
        position.nonfinite_in_row,
        state.settings.train_samples,
        (compute, seconds),
        step_settings.updates_per_epoch,
    )
    if partial is not None:
        tally.step_costs = partial_step_costs(partial, step_settings.updates_per_epoch)
    resume = (position.subset, done) if partial is not None else None
    clock = step_settings.clock
    tally.extra_selection_seconds += prepare_epoch(
        state.selector, state.train_loader, epoch, resume, clock.position(epoch, compute, seconds)
    )
    position.partial = position.subset = None
    start_epoch(context, tally, epoch, len(state.train_loader), step_rows(state.cfg))
    if partial is not None:
        compute, seconds = tally.spent()
        seconds = clock.seconds(seconds, position.optimizer_steps, force=True)
        at = clock.position(epoch + tally.epoch_fraction(), compute, seconds)
        if state.optimization.scheduler is not None:  # None: no LR schedule, as train_batch allows
            state.optimization.scheduler.step_update(num_updates=step_settings.updates_per_epoch * at)
    return tally


def progress_bar(state: RunState, epoch: int, tally: EpochTally) -> tqdm:
    """The epoch's progress bar (rank 0, runtime.progress; tqdm also stays off where no terminal is)."""
    shown = state.cfg.runtime.progress and state.settings.dist.is_main
    return tqdm(
        total=tally.last_batch,
        initial=tally.batches,
        desc=f"epoch {epoch}",
        leave=False,
        dynamic_ncols=True,
        disable=True if not shown else None,
    )


def show_progress(bar: tqdm, tally: EpochTally, result: StepResult, log_every: int) -> None:
    """Advance the bar one step; every `log_every` steps show loss, kept fraction and speed (a host read)."""
    bar.update(1)
    if not bar.disable and tally.batches % log_every == 0:
        bar.set_postfix(
            loss=f"{result.loss.item():.3f}",
            kept=f"{kept_so_far(tally):.2f}",
            img_s=f"{tally.rows_seen / tally.elapsed:.0f}",
        )


def end_epoch(state: RunState, context: StepContext, tally: EpochTally, logger: RunLogger, wall_start: float) -> bool:
    """The epoch's record (statistics, accounting, evaluation, comparison with the baseline), its checkpoint
    and its log line. Returns whether the run is over: its epochs trained or its budget spent."""
    dist, position, optimization = state.settings.dist, state.position, state.optimization
    epoch, clock = tally.epoch, state.settings.step_settings.clock
    stats = epoch_statistics(context, tally)
    position.nonfinite_in_row = tally.nonfinite_in_row
    if stats["samples_seen"] + stats["bad_samples"] == 0:  # every rank took no step: a subset under one batch
        raise TrainingStopped(no_step_line(state.cfg, epoch, state.train_loader.sampler, dist.world_size))
    report_unreadable(state, logger, epoch, stats.pop("unreadable"))
    # The training seconds the budget counts: the epochs' time, evaluation excluded (the slowest rank's)
    stats["seconds_spent"] = clock.seconds(tally.seconds_before + stats["epoch_seconds"], 0, force=True)
    last = clock.ended(epoch + 1, tally.spent()[0], stats["seconds_spent"])
    stats.update(epoch_accounting(state, tally, stats, budget_ended=clock.budget is not None and last))
    average_batch_norms(state)
    class_rows = stats.pop("class_rows")  # not recorded: class_kept_fraction is the per-class record
    record = {"epoch": epoch, "lr": optimization.optimizer.param_groups[0]["lr"], **stats}
    starved = starved_classes(record["class_kept_fraction"], class_rows)
    if starved:
        record["starved_classes"] = starved
        if dist.is_main:
            print(starvation_warning(epoch, starved, record["class_kept_fraction"], state.cfg), flush=True)
    if (epoch + 1) % state.cfg.runtime.eval_every == 0 or last:
        record.update(evaluate(state.train_module, state.val_loader, context.settings))
        if optimization.ema is not None:
            ema = evaluate(optimization.ema.module, state.val_loader, context.settings)
            record.update(top1_ema=ema["top1"], top5_ema=ema["top5"])
    record["wall_seconds"] = time.perf_counter() - wall_start
    position.history.append(record)
    if state.baseline is not None:
        record.update(state.baseline.compare(record, sum(r["epoch_seconds"] for r in position.history)))
    best = state.cfg.runtime.save_best and record.get("top1", float("-inf")) > position.best_top1
    checkpoint_run(state, epoch + 1, None, best=best)
    if dist.is_main:
        logger.log_epoch(record)
        print(epoch_line(record), flush=True)
    barrier()
    return last


def report_unreadable(state: RunState, logger: RunLogger, epoch: int, unreadable: list[int]) -> None:
    """Rank 0: log and name the epoch's unreadable training samples (dataset indices, over all ranks)."""
    if unreadable and state.settings.dist.is_main:
        names = [state.sample_name(i) for i in unreadable]
        logger.log_unreadable(epoch, names)
        assert state.run_dir is not None  # rank 0's, set by setup
        print(unreadable_warning(epoch, names, state.run_dir / UNREADABLE_FILE), flush=True)


def epoch_accounting(state: RunState, tally: EpochTally, stats: dict, budget_ended: bool) -> dict:
    """samples_seen/kept/blocked and kept_fraction of the epoch (records.sample_accounting), over the sample
    slots it stands for: a full-data epoch's, those left of an epoch resumed inside (perhaps with another batch
    size or world size), and the share trained of an epoch the budget ended (`budget_ended`; then also
    `epoch_fraction`). Takes samples_seen and samples_kept out of `stats`."""
    seen, bad = stats.pop("samples_seen"), stats["bad_samples"]
    epoch_samples = tally.order_total  # samples of the epoch's order, those before a resume included
    nominal = state.settings.nominal_rows
    if tally.order_base > 0:  # resumed inside the epoch
        subset = cast(TrainSampler, state.train_loader.sampler).subset
        nominal = epoch_samples if subset is None else max(nominal, seen + bad)
    fraction = tally.order_done() / epoch_samples if epoch_samples else 1.0
    extra = {}
    if budget_ended and fraction < 1:  # the budget ended the epoch here
        nominal = round(nominal * fraction)
        extra["epoch_fraction"] = fraction
    return {**extra, **sample_accounting(seen, stats.pop("samples_kept"), bad, nominal)}


def average_batch_norms(state: RunState) -> None:
    """Under DDP ranks saw different batches: average the BatchNorm statistics (without SyncBatchNorm), and
    each rank's EMA, which averaged its own (timm's train.py)."""
    dist = state.settings.dist
    if dist.world_size > 1 and not state.cfg.runtime.sync_bn:
        distribute_bn(state.net, dist.world_size, reduce=True)
    if dist.world_size > 1 and state.optimization.ema is not None:
        distribute_bn(state.optimization.ema.module, dist.world_size, reduce=True)


def export_weights(state: RunState) -> None:
    """Rank 0, at the run's end: the last weights (and the EMA's) as timm models in export/ (export.py; the
    best are written with their checkpoint)."""
    cfg, run_dir, data_config = state.cfg, state.run_dir, state.settings.data_config
    if run_dir is None:
        return
    reason = export_into_run(cfg, run_dir, "last", state.net.model, data_config)
    if reason is not None:
        print(f"note: no timm export of this run: {reason}")
    elif state.optimization.ema is not None:
        export_into_run(cfg, run_dir, "ema", state.optimization.ema.module.model, data_config)


def finish(state: RunState, logger: RunLogger, wall_start: float) -> dict:
    """The run's summary: written to summary.json and printed as the done line (rank 0); returned."""
    cfg, dist = state.cfg, state.settings.dist
    summary = summarize(
        cfg,
        state.position.history,
        time.perf_counter() - wall_start,
        str(state.run_dir) if state.run_dir else None,
        dist.world_size,
        dist.device.type,
        state.settings.class_counts,
    )
    ranking = None if state.net.mode != "recompute" or state.score is None else vars(state.score)
    summary.update(blocking_mode=state.net.mode, blocking_mode_reason=state.mode_reason, ranking_pass=ranking)
    if dist.is_main:
        logger.write_summary(summary)
        export_weights(state)
        spent = "" if cfg.schedule.budget is None else f"  compute {summary['compute_spent']:.2f} full-data epochs"
        print(
            f"done: top-1 {summary['top1']:.2f}%  blocked {summary['blocked_fraction']:.3f} of sample-passes  "
            f"{summary['seconds_per_epoch']:.1f} s/epoch{spent}  ({summary['run_dir']})"
        )
    return summary
