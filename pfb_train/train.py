"""Wire config -> data, model, selector, optimizer, schedule -> epochs -> run directory.

`setup` builds one run (a RunState, run_state.py), `fit` trains it epoch by epoch (engine.py), checkpoints
it (resume.py) and reports it (records.py, metrics.py). This module only connects them.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
import traceback
from typing import Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pfb_train.calibrate import ModeChoice, resolve_mode
from pfb_train.config import Config, save_config
from pfb_train.budget import RunClock, spent_so_far
from pfb_train.costs import StepCost, blocking_mode, shallow_flop_share
from pfb_train.data import build_datasets, build_loaders, dataset_labels
from pfb_train.data.splits import sample_namer
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
    EpochTally,
    Optimization,
    StepContext,
    StepSettings,
    evaluate,
    prepare_epoch,
    train_one_epoch,
)
from pfb_train.errors import Preempted, RunFinished, TrainingStopped, UserError, squeezed
from pfb_train.metrics import UNREADABLE_FILE, BaselineComparison, RunLogger, make_run_dir, rewrite_metrics
from pfb_train.models import build_model, check_score_pass, check_training_rows
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
    kind, rank, message = announced
    return RUN_ENDING[kind](f"{message} (on rank {rank})")


def setup(cfg: Config, dist: DistInfo) -> RunState:
    """Everything a run needs before its first step, resumed from a checkpoint when runtime.resume says so."""
    rt, o, s = cfg.runtime, cfg.optim, cfg.schedule
    baseline = BaselineComparison(rt.baseline) if rt.baseline else None  # a bad path fails before any work
    if rt.threads:
        torch.set_num_threads(rt.threads)
    device = dist.device
    if rt.sync_bn and dist.world_size > 1 and device.type != "cuda":  # before any data or model is built
        raise UserError(
            f"config key 'runtime.sync_bn' needs CUDA devices (SyncBatchNorm runs on GPUs only); this "
            f"run is on {device.type}: set runtime.sync_bn=false"
        )
    if device.type == "cuda":
        # Shapes are fixed per step (the kept count is too), so autotuned conv kernels are found
        # once and reused; TF32 runs float32 matmuls on tensor cores.
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
        precision = "tf32" if rt.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision
    seed_everything(rt.seed)  # the same initial model on every rank
    run_dir, checkpoint = resume_point(rt.resume, rt.output, cfg.name)
    if checkpoint is not None:  # before any work: what cannot go on says so at once
        check_resumable(cfg, checkpoint)
        refuse_finished(cfg, run_dir, checkpoint)
        changed = changed_settings(checkpoint.get("config", {}), cfg.to_dict())
        if changed and dist.is_main:  # e.g. a default that changed since the checkpoint was written
            print(f"note: resuming with settings other than the checkpoint's: {'; '.join(changed)}")

    splits = build_datasets(cfg.data, cfg.model.num_classes, seed=rt.seed)
    train_loader, val_loader = build_loaders(
        splits,
        cfg.data,
        rt.seed,
        dist.rank,
        dist.world_size,
        pin_memory=device.type == "cuda",
        device=device,
        channels_last=rt.channels_last,
    )
    method = get_method(cfg.blocking.method)
    net = build_model(
        cfg.model,
        cfg.blocking.stage,
        splits.num_classes,
        blocking_mode(cfg.blocking),
        sync_bn=rt.sync_bn and dist.world_size > 1,
        img_size=cfg.data.img_size,
    ).to(device)
    if rt.channels_last:
        net = net.to(memory_format=torch.channels_last)
    score = check_score_pass(
        net, method.score_pass(cfg.blocking.chosen()), cfg.data.img_size, f"blocking.{cfg.blocking.method}"
    )
    shallow_share = shallow_flop_share(
        net, cfg.data.img_size, net.in_chans
    )  # the cost model's s; before compile: one image
    # A resumed run keeps its checkpoint's mode (restore below): timing again could pick the other one.
    mode = resolve_mode(cfg, net, AMP_DTYPES[rt.amp]) if checkpoint is None else None
    if mode is not None:
        net.mode = mode.mode
    elif checkpoint is not None:  # decided here once: the checks, the cost model and the steps all read net.mode
        net.mode = checkpoint["blocking_mode"]
    batch = cfg.data.batch_size
    check_training_rows(
        net,
        cfg.data.img_size,
        batch,
        batch - round(method.blocked_fraction_per_batch(cfg.blocking.chosen()) * batch),
        method.ratio_key,
        synced_ranks=dist.world_size if rt.sync_bn else 1,
    )
    ema = ModelEmaV3(net, decay=o.ema_decay) if o.ema_decay else None  # a plain copy: before DDP/compile
    seed_everything(derive_seed("rank", rt.seed, dist.rank))  # dropout, drop-path, mixup: each rank its own
    train_module = net
    if dist.world_size > 1:
        train_module = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if rt.compile:
        net.compile_parts()  # after DDP wrapping: DDP hooks stay on the original parameters
    selector = selector_from_config(cfg, splits.num_classes)
    check_epoch_size(cfg, selector.fewest_samples(len(splits.train)), len(splits.train), dist.world_size)

    try:  # a name timm lists may still need what this machine lacks (bitsandbytes, APEX, CUDA)
        optimizer = create_optimizer_v2(net, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
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
        updates_per_epoch=len(train_loader),
    )
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.data.mixup,
            cutmix_alpha=cfg.data.cutmix,
            label_smoothing=o.label_smoothing,
            num_classes=splits.num_classes,
        )
    optimization = Optimization(
        optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16"), ema, mixup
    )
    check_finite = device.type != "cuda" if rt.check_finite is None else rt.check_finite  # None: see config.py
    # The mode a resumed run goes on in is its checkpoint's (restore, below).
    step_cost = StepCost(net.mode, shallow_share, score.scale if net.mode == "recompute" else 1.0)
    step_settings = StepSettings(
        device,
        AMP_DTYPES[rt.amp],
        rt.channels_last,
        o.label_smoothing,
        o.clip_grad,
        rt.log_every,
        updates_per_epoch=len(train_loader),
        check_finite=check_finite,
        max_nonfinite=rt.max_nonfinite,
        step_cost=step_cost,
        clock=RunClock(s.epochs, s.budget, s.budget_unit, every=rt.log_every),
    )

    labels = dataset_labels(splits.train)
    class_counts = None if labels is None else tuple(torch.bincount(labels, minlength=splits.num_classes).tolist())
    settings = RunSettings(
        cfg,
        dist,
        step_settings,
        len(train_loader) * cfg.data.batch_size * dist.world_size,
        class_counts,
        len(splits.train),
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
        sample_name=sample_namer(splits.train),
    )  # messages name unreadable samples
    if checkpoint is not None:
        restore(state, checkpoint)
        check_position(state, checkpoint)
        if cfg.blocking.mode != "auto" and cfg.blocking.mode != net.mode:
            raise UserError(
                f"cannot resume: the checkpoint was trained with blocking.mode {net.mode!r}, this config "
                f"sets {cfg.blocking.mode!r}; set blocking.mode auto (or {net.mode}) to go on"
            )
        mode = ModeChoice(net.mode, "as in the checkpoint", None)
    state.mode_reason, state.score = mode.reason, score
    if dist.is_main:
        state.run_dir = run_dir or make_run_dir(rt.output, cfg.name)
        state.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, state.run_dir / "config.yaml")  # a finished run never gets here (refuse_finished)
        if rt.resume is not None:  # the checkpoint's history is the truth: drop epochs logged after it
            rewrite_metrics(state.run_dir, state.position.history)
        print(
            f"run {cfg.name}: {cfg.model.name} on {describe_data(cfg, len(splits.train))}, "
            f"split after {net.stage_name} (stage {net.stage}), blocking {describe_options(cfg)} "
            f"(mode {net.mode}: {mode.reason}{ranking_pass(net, score)}), "
            f"{len(train_loader)} steps per full-data epoch{describe_budget(cfg)}, {dist.world_size} process(es) "
            f"on {device.type} -> {state.run_dir}"
        )
        if checkpoint is not None:
            print(f"resumed at epoch {state.position.epoch}, step {state.position.optimizer_steps}")
        for note in splits.notes:
            print(note)
        left_out = len(splits.train) - settings.nominal_rows
        if left_out > 0:  # equal whole batches on every rank; the rest is not silently lost, it rotates
            print(
                f"note: {left_out} of {len(splits.train)} training samples sit out each epoch (less than one "
                f"global batch of {dist.world_size} x {cfg.data.batch_size}); which ones changes every epoch"
            )
        start = getattr(cfg.blocking.chosen(), "start_epoch", 0)
        if start >= cfg.schedule.epochs:
            print(
                f"note: blocking.{cfg.blocking.method}.start_epoch {start} is not within schedule.epochs "
                f"{cfg.schedule.epochs}: this run trains on full data"
            )
        if s.warmup_epochs >= s.epochs:
            print(
                f"note: schedule.warmup_epochs {s.warmup_epochs} is not below schedule.epochs {s.epochs}: the whole "
                f"run is warm-up (the LR climbs from schedule.warmup_lr towards optim.lr {o.lr}) and the "
                f"{s.name} schedule never starts"
            )
    state.location = str(all_gather_objects(str(state.run_dir) if dist.is_main else None)[0])
    state.resume_option = resume_option(state.location, rt.output, cfg.name)
    return state


def check_epoch_size(cfg: Config, fewest: int, train_samples: int, world_size: int) -> None:
    """Refuse a sampler-level selection that leaves an epoch fewer samples than one global batch (it would
    train no step): `fewest` is what the method says it may leave of `train_samples` (Selector.fewest_samples).
    A whole set under one global batch is build_loaders' error, found before."""
    if fewest >= cfg.data.batch_size * world_size:
        return
    method = get_method(cfg.blocking.method)
    key = method.ratio_key
    raise UserError(
        f"config key '{key}' {method.ratio(cfg.blocking.chosen())} can leave an epoch {fewest} of the "
        f"{train_samples} training samples, fewer than one global batch (data.batch_size "
        f"{cfg.data.batch_size} x {world_size} process(es)): such an epoch trains no step; lower {key} "
        "or data.batch_size"
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
    cfg, dist, rt, position = state.cfg, state.settings.dist, state.cfg.runtime, state.position
    step_settings, optimization = state.settings.step_settings, state.optimization
    context = StepContext(state.train_module, state.selector, step_settings, optimization)
    wall_start = time.perf_counter() - (position.history[-1]["wall_seconds"] if position.history else 0.0)
    clock = step_settings.clock
    with PreemptionSignals(every=rt.log_every, device=dist.device, announce=dist.is_main) as signals:
        first = position.epoch
        for epoch in itertools.count(first):
            compute, seconds = spent_so_far(position.history)  # by the epochs before this one
            # The run's end is decided once per epoch, at its end (`last`, below): here only for where a
            # resume starts (a checkpoint's history is rank 0's, the same on every rank).
            if epoch == first and position.partial is None and clock.ended(epoch, compute, seconds):
                break
            if until_epoch is not None and epoch >= until_epoch:
                return None
            partial = position.partial
            done = partial["order_done"] if partial is not None else 0
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
            tally.extra_selection_seconds += prepare_epoch(
                state.selector, state.train_loader, epoch, resume, clock.position(epoch, compute, seconds)
            )
            position.partial = position.subset = None
            rest = len(state.train_loader) * cfg.data.batch_size * dist.world_size  # samples left this epoch
            if partial is not None:  # this config's schedule from the first step on, not the saved lr
                compute, seconds = tally.spent()
                at = clock.position(
                    epoch + done / (done + rest), compute, clock.seconds(seconds, position.optimizer_steps, force=True)
                )
                optimization.scheduler.step_update(num_updates=step_settings.updates_per_epoch * at)

            # Reached after the same number of steps on every rank (after a resume with another number
            # of processes rank 0 holds the merged tally): the forced check below is collective.
            last_batch = tally.batches + len(state.train_loader)

            def after_step(tally: EpochTally, epoch: int = epoch, last_batch: int = last_batch) -> bool:
                position.optimizer_steps += 1
                steps = position.optimizer_steps
                # At the epoch's last step too: a signal is not left waiting through the evaluation.
                signum = signals.requested(steps, force=tally.batches == last_batch)
                stop = signum or (until_step is not None and steps >= until_step)
                if stop or (rt.checkpoint_every and steps % rt.checkpoint_every == 0):
                    checkpoint_run(state, epoch, tally)
                if signum:
                    raise preempted(signum, f"at epoch {epoch}, step {steps}", state)
                return bool(stop)

            bar = tqdm(
                total=last_batch,
                initial=tally.batches,
                desc=f"epoch {epoch}",
                leave=False,
                dynamic_ncols=True,
                disable=True if not (rt.progress and dist.is_main) else None,
            )
            stats = train_one_epoch(context, state.train_loader, epoch, tally, after_step, bar)
            bar.close()
            if stats is None:  # stopped early: rank 0 has written the checkpoint once every rank returns
                barrier()
                return None
            position.nonfinite_in_row = tally.nonfinite_in_row
            seen, bad = stats["samples_seen"], stats["bad_samples"]
            if seen + bad == 0:  # every rank took no step (equal shares): a subset under one global batch
                raise TrainingStopped(no_step_line(cfg, epoch, state.train_loader.sampler, dist.world_size))
            unreadable = stats.pop("unreadable")  # dataset indices, over all ranks
            if unreadable and dist.is_main:
                names = [state.sample_name(i) for i in unreadable]
                logger.log_unreadable(epoch, names)
                print(unreadable_warning(epoch, names, state.run_dir / UNREADABLE_FILE), flush=True)
            nominal = state.settings.nominal_rows
            if partial is not None:  # resumed inside the epoch, perhaps with another batch size or world size
                # (`rest` is 0 when the checkpoint came from the epoch's last step)
                nominal = done + rest if state.train_loader.sampler.subset is None else max(nominal, seen + bad)
            # The training seconds the budget counts: the epochs' time, evaluation excluded (the slowest rank's)
            stats["seconds_spent"] = clock.seconds(tally.seconds_before + stats["epoch_seconds"], 0, force=True)
            last = clock.ended(epoch + 1, tally.spent()[0], stats["seconds_spent"])
            fraction = tally.order_done() / (done + rest) if done + rest else 1.0
            if clock.budget is not None and last and fraction < 1:  # the budget ended the epoch here
                nominal = round(nominal * fraction)
                stats["epoch_fraction"] = fraction
            stats.update(sample_accounting(stats.pop("samples_seen"), stats.pop("samples_kept"), bad, nominal))
            if dist.world_size > 1 and not rt.sync_bn:  # ranks saw different batches: average BN statistics
                distribute_bn(state.net, dist.world_size, reduce=True)
            if (
                dist.world_size > 1 and optimization.ema is not None
            ):  # each rank's EMA averaged its own (timm's train.py)
                distribute_bn(optimization.ema.module, dist.world_size, reduce=True)
            class_rows = stats.pop("class_rows")  # not recorded: class_kept_fraction is the per-class record
            record = {"epoch": epoch, "lr": optimization.optimizer.param_groups[0]["lr"], **stats}
            starved = starved_classes(record["class_kept_fraction"], class_rows)
            if starved:
                record["starved_classes"] = starved
                if dist.is_main:
                    print(starvation_warning(epoch, starved, record["class_kept_fraction"], cfg), flush=True)
            if (epoch + 1) % rt.eval_every == 0 or last:
                record.update(evaluate(state.train_module, state.val_loader, step_settings))
                if optimization.ema is not None:
                    ema = evaluate(optimization.ema.module, state.val_loader, step_settings)
                    record.update(top1_ema=ema["top1"], top5_ema=ema["top5"])
            record["wall_seconds"] = time.perf_counter() - wall_start
            position.history.append(record)
            if state.baseline is not None:
                record.update(state.baseline.compare(record, sum(r["epoch_seconds"] for r in position.history)))
            checkpoint_run(state, epoch + 1, None, best=record.get("top1", float("-inf")) > position.best_top1)
            if dist.is_main:
                logger.log_epoch(record)
                print(epoch_line(record), flush=True)
            barrier()
            # A signal that came during the evaluation or the checkpoint: stop here, the epoch is saved.
            # After the last epoch the run ends as finished instead (its summary takes a moment).
            signum = signals.requested(position.optimizer_steps, force=True)
            if signum and not last:
                raise preempted(signum, f"after epoch {epoch}, step {position.optimizer_steps}", state)
            if signum and dist.is_main:
                print(f"note: {signal.Signals(signum).name} came as the last epoch ended: the run finishes", flush=True)
            if last:
                break

    summary = summarize(
        cfg,
        position.history,
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
        spent = "" if cfg.schedule.budget is None else f"  compute {summary['compute_spent']:.2f} full-data epochs"
        print(
            f"done: top-1 {summary['top1']:.2f}%  blocked {summary['blocked_fraction']:.3f} of sample-passes  "
            f"{summary['seconds_per_epoch']:.1f} s/epoch{spent}  ({summary['run_dir']})"
        )
    return summary
