"""Wire config -> data, model, selector, optimizer, schedule -> epochs -> run directory."""

from __future__ import annotations

import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pfb_train.calibrate import ModeChoice, resolve_mode
from pfb_train.checkpoint import (all_rng_states, has_checkpoint_files, latest_checkpoint, load_checkpoint,
                                  restore_rng, save_checkpoint)
from pfb_train.config import Config, experiment_settings, save_config
from pfb_train.costs import blocking_mode
from pfb_train.data import build_datasets, build_loaders, dataset_labels
from pfb_train.data.loaders import ShardOrderSampler
from pfb_train.distributed import (DistInfo, all_gather_objects, announce_stop, barrier, cleanup,
                                   init_distributed, sharing_stops, stopped_elsewhere, watch_for_stops)
from pfb_train.errors import Preempted, RunFinished, TrainingStopped, UserError
from pfb_train.engine import EpochTally, StepSettings, Trainer, evaluate, prepare_epoch, train_one_epoch
from pfb_train.metrics import BaselineComparison, RunLogger, make_run_dir, rewrite_metrics
from pfb_train.models import BlockedModel, ScorePass, build_model, check_score_pass
from pfb_train.preemption import PreemptionSignals
from pfb_train.seeding import derive_seed
from pfb_train.selection import Selector, get_method, selector_from_config

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed takes 32 bits
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RunSettings:
    """What stays fixed for the whole run."""

    cfg: Config
    dist: DistInfo
    step: StepSettings
    nominal_rows: int  # rows a full-data epoch trains on, over all ranks
    class_counts: Optional[tuple]  # training samples per class (None: the dataset does not say)
    train_samples: int  # size of the training set (a checkpoint holds it: per-sample state must fit)


@dataclass
class Progress:
    """Where the run is; `fit` goes on from `epoch` / `step`."""

    epoch: int = 0  # next epoch to train
    step: int = 0  # optimizer steps so far
    best_top1: float = float("-inf")
    history: list = field(default_factory=list)
    partial: Optional[dict] = None  # EpochTally state when resuming inside an epoch
    subset: Optional[torch.Tensor] = None  # that epoch's sampler subset


@dataclass
class RunState:
    """One run between `setup` and `fit`: its settings, the live objects, and its progress."""

    settings: RunSettings
    net: BlockedModel  # the split model itself: checkpoints, EMA, state comparisons
    train_module: torch.nn.Module  # what the steps call: `net`, or DDP around it
    selector: Selector
    trainer: Trainer
    train_loader: DataLoader
    val_loader: DataLoader
    baseline: Optional[BaselineComparison] = None
    run_dir: Optional[Path] = None  # rank 0 only
    location: str = ""  # the run directory as every rank names it (messages)
    progress: Progress = field(default_factory=Progress)
    mode_reason: str = ""  # why blocking.mode resolved to net.mode (the run line, summary.json)
    score: Optional[ScorePass] = None  # recompute mode's ranking pass, automatic parts resolved

    @property
    def cfg(self) -> Config:
        return self.settings.cfg


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
    rt, o, s = cfg.runtime, cfg.optim, cfg.schedule
    baseline = BaselineComparison(rt.baseline) if rt.baseline else None  # a bad path fails before any work
    if rt.threads:
        torch.set_num_threads(rt.threads)
    device = dist.device
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

    splits = build_datasets(cfg.data, cfg.model.num_classes, seed=rt.seed)
    train_loader, val_loader = build_loaders(splits, cfg.data, rt.seed, dist.rank, dist.world_size,
                                             pin_memory=device.type == "cuda", device=device,
                                             channels_last=rt.channels_last)
    net = build_model(cfg.model, cfg.blocking.stage, splits.num_classes, blocking_mode(cfg.blocking),
                      sync_bn=rt.sync_bn and dist.world_size > 1, img_size=cfg.data.img_size).to(device)
    if rt.channels_last:
        net = net.to(memory_format=torch.channels_last)
    score = check_score_pass(net, get_method(cfg.blocking.method).score_pass(cfg.blocking.chosen()), cfg.data.img_size,
                             f"blocking.{cfg.blocking.method}")
    # A resumed run keeps its checkpoint's mode (restore below): timing again could pick the other one.
    mode = resolve_mode(cfg, net, AMP_DTYPES[rt.amp]) if checkpoint is None else None
    if mode is not None:
        net.mode = mode.mode
    ema = ModelEmaV3(net, decay=o.ema_decay) if o.ema_decay else None  # a plain copy: before DDP/compile
    seed_everything(derive_seed("rank", rt.seed, dist.rank))  # dropout, drop-path, mixup: each rank its own
    train_module = net
    if dist.world_size > 1:
        train_module = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if rt.compile:
        net.compile_parts()  # after DDP wrapping: DDP hooks stay on the original parameters
    selector = selector_from_config(cfg)

    try:  # a name timm lists may still need what this machine lacks (bitsandbytes, APEX, CUDA)
        optimizer = create_optimizer_v2(net, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    except (AssertionError, ImportError, ValueError, TypeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"config key 'optim.name': timm cannot make optimizer '{o.name}' here ({reason})") from None
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.name, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                                       warmup_lr=s.warmup_lr, min_lr=s.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                      label_smoothing=o.label_smoothing, num_classes=splits.num_classes)
    trainer = Trainer(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16"), ema, mixup)
    check_finite = device.type != "cuda" if rt.check_finite is None else rt.check_finite  # None: see config.py
    step = StepSettings(device, AMP_DTYPES[rt.amp], rt.channels_last, o.label_smoothing, o.clip_grad, rt.log_every,
                        updates_per_epoch=len(train_loader), check_finite=check_finite, max_nonfinite=rt.max_nonfinite)

    labels = dataset_labels(splits.train)
    class_counts = None if labels is None else tuple(torch.bincount(labels, minlength=splits.num_classes).tolist())
    settings = RunSettings(cfg, dist, step, len(train_loader) * cfg.data.batch_size * dist.world_size, class_counts,
                           len(splits.train))
    state = RunState(settings, net, train_module, selector, trainer, train_loader, val_loader, baseline)
    if checkpoint is not None:
        restore(state, checkpoint)
        check_position(state, checkpoint)
        if cfg.blocking.mode != "auto" and cfg.blocking.mode != net.mode:
            raise UserError(f"cannot resume: the checkpoint was trained with blocking.mode {net.mode!r}, this config "
                            f"sets {cfg.blocking.mode!r}; set blocking.mode auto (or {net.mode}) to go on")
        mode = ModeChoice(net.mode, "as in the checkpoint", None)
    state.mode_reason, state.score = mode.reason, score
    if dist.is_main:
        state.run_dir = run_dir or make_run_dir(rt.output, cfg.name)
        state.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, state.run_dir / "config.yaml")  # a finished run never gets here (refuse_finished)
        if rt.resume is not None:  # the checkpoint's history is the truth: drop epochs logged after it
            rewrite_metrics(state.run_dir, state.progress.history)
        print(f"run {cfg.name}: {cfg.model.name} on {describe_data(cfg, len(splits.train))}, "
              f"split after {net.stage_name} (stage {net.stage}), blocking {describe_options(cfg)} "
              f"(mode {net.mode}: {mode.reason}{ranking_pass(net, score)}), "
              f"{len(train_loader)} steps/epoch, {dist.world_size} process(es) on {device.type} -> {state.run_dir}")
        if checkpoint is not None:
            print(f"resumed at epoch {state.progress.epoch}, step {state.progress.step}")
        for note in splits.notes:
            print(note)
        left_out = len(splits.train) - settings.nominal_rows
        if left_out > 0:  # equal whole batches on every rank; the rest is not silently lost, it rotates
            print(f"note: {left_out} of {len(splits.train)} training samples sit out each epoch (less than one "
                  f"global batch of {dist.world_size} x {cfg.data.batch_size}); which ones changes every epoch")
        start = getattr(cfg.blocking.chosen(), "start_epoch", 0)
        if start >= cfg.schedule.epochs:
            print(f"note: blocking.{cfg.blocking.method}.start_epoch {start} is not within schedule.epochs "
                  f"{cfg.schedule.epochs}: this run trains on full data")
    state.location = str(all_gather_objects(str(state.run_dir) if dist.is_main else None)[0])
    return state


def describe_data(cfg: Config, train_samples: int) -> str:
    """'synthetic (2048 training samples)', 'imagefolder /data/imagenet (1281167 training samples)'."""
    where = f" {cfg.data.root}" if cfg.data.root else ""
    return f"{cfg.data.dataset}{where} ({train_samples} training samples)"


def ranking_pass(net: BlockedModel, score) -> str:
    """'; ranking pass at 0.5x, running statistics' in recompute mode (nothing in reuse: it has none)."""
    if net.mode != "recompute":
        return ""
    return f"; ranking pass at {score.scale}x, {score.norm} statistics"


def describe_options(cfg: Config) -> str:
    """The chosen method and its ratio option, e.g. 'pfb ratio 0.4', 'infobatch prune_ratio 0.5', 'none'."""
    method = get_method(cfg.blocking.method)
    if not method.ratio_option:
        return method.name
    return f"{method.name} {method.ratio_option} {method.ratio(cfg.blocking.chosen())}"


def resume_point(resume: Optional[str], output: str, name: str):
    """(run directory, checkpoint) to continue from. `auto`: runs/<name>, fresh if it holds no checkpoint;
    a run directory or checkpoint file: must hold a readable checkpoint."""
    if resume is None:
        return None, None
    if resume == "auto":
        run_dir = Path(output).expanduser() / name
        checkpoint = latest_checkpoint(run_dir)[1]
        if checkpoint is None and has_checkpoint_files(run_dir):  # starting afresh would overwrite its metrics
            raise UserError(f"no checkpoint in {run_dir} is readable (checkpoint-last.pt and checkpoint-prev.pt): "
                            "move the run directory away to start afresh, or give another name")
        return run_dir, checkpoint
    path = Path(resume).expanduser()
    checkpoint = latest_checkpoint(path)[1] if path.is_dir() else load_checkpoint(path)
    if checkpoint is None:
        raise UserError(f"cannot resume from {path}: no readable checkpoint there (runtime.resume)")
    return (path if path.is_dir() else path.parent), checkpoint


class Part(NamedTuple):
    """One entry of a checkpoint: how it is read from a run and put back into one."""

    key: str
    save: Callable  # (state) -> value
    load: Callable  # (state, value) -> None


def _load_ema(state: RunState, value) -> None:
    if state.trainer.ema is not None and value is not None:
        state.trainer.ema.load_state_dict(value)


def _set_progress(name: str) -> Callable:
    return lambda state, value: setattr(state.progress, name, value)


def _restore_rng(state: RunState, value) -> None:
    if not restore_rng(value):
        print("pfb-train: warning: the world size changed since the checkpoint; random streams restart",
              file=sys.stderr)


# Everything a checkpoint holds, in one list: `save_checkpoints` writes these keys and `restore` reads
# them back. `partial` and `subset` are set only by a checkpoint written inside an epoch.
CHECKPOINT_PARTS = (
    Part("model", lambda s: s.net.state_dict(), lambda s, v: s.net.load_state_dict(v)),
    Part("optimizer", lambda s: s.trainer.optimizer.state_dict(), lambda s, v: s.trainer.optimizer.load_state_dict(v)),
    Part("scaler", lambda s: s.trainer.scaler.state_dict(), lambda s, v: s.trainer.scaler.load_state_dict(v)),
    Part("ema", lambda s: s.trainer.ema.state_dict() if s.trainer.ema is not None else None, _load_ema),
    Part("selector", lambda s: s.selector.state_dict(), lambda s, v: s.selector.load_state_dict(v)),
    Part("blocking_mode", lambda s: s.net.mode, lambda s, v: setattr(s.net, "mode", v) if v else None),
    Part("epoch", lambda s: s.progress.epoch, _set_progress("epoch")),
    Part("step", lambda s: s.progress.step, _set_progress("step")),
    Part("history", lambda s: s.progress.history, _set_progress("history")),
    Part("best_top1", lambda s: s.progress.best_top1, _set_progress("best_top1")),
    Part("partial", lambda s: s.progress.partial, _set_progress("partial")),  # see upgrade_partial
    Part("subset", lambda s: s.progress.subset, _set_progress("subset")),
    Part("rng", lambda s: all_rng_states(), _restore_rng),
    Part("config", lambda s: s.cfg.to_dict(), lambda s, v: None),  # read by check_resumable, refuse_finished
    Part("train_samples", lambda s: s.settings.train_samples, lambda s, v: None),  # read by check_position
)
# No scheduler entry: the LR is a function of the config and the position (epochs and fractions of one),
# so a resume with another batch size or number of processes follows the schedule the config describes.


# Settings a checkpoint cannot be continued under: its weights or its selector state would not fit.
MUST_MATCH = ("model.name", "model.num_classes", "model.cifar_stem", "blocking.method", "blocking.stage")


def check_resumable(cfg: Config, checkpoint: dict) -> None:
    saved, now = checkpoint.get("config", {}), cfg.to_dict()
    for key in MUST_MATCH:
        section, option = key.split(".")
        before, after = saved.get(section, {}).get(option), now[section][option]
        if option == "num_classes" and before is None:  # taken from the dataset: compared through the weights
            continue
        if before != after:
            raise UserError(f"cannot resume: the checkpoint was trained with {key} {before!r}, this config has "
                            f"{after!r}; use another run name (name=...) to start a new run")


# Settings that change nothing about what is trained: a finished run relaunched with other values of
# these is the same run.
HOW_IT_RUNS = ("runtime.resume", "runtime.progress", "runtime.log_every", "runtime.threads", "runtime.output",
               "runtime.checkpoint_every", "runtime.baseline", "data.workers")


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'key before -> after' for every setting that differs between two configs' dicts (the methods'
    sections of the chosen method only), leaving out HOW_IT_RUNS."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, after = flat(experiment_settings(saved)), flat(experiment_settings(now))
    keys = [k for k in dict.fromkeys([*before, *after]) if k not in HOW_IT_RUNS and before.get(k) != after.get(k)]
    return [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys]


def refuse_finished(cfg: Config, run_dir: Path, checkpoint: dict) -> None:
    """A run whose checkpoint ends its schedule is done: its files stay as they are. Raises RunFinished
    (exit 0) when relaunched as it was, UserError when relaunched with other settings."""
    done = checkpoint.get("epoch", 0)
    if checkpoint.get("partial") is not None or done < cfg.schedule.epochs:
        return
    evaluated = [r for r in checkpoint.get("history", []) if "top1" in r]
    epochs = f"{done} epoch{'s' if done != 1 else ''}" + (f", top-1 {evaluated[-1]['top1']:.2f}%" if evaluated else "")
    how = (f"nothing trained, no file written. To train longer: --resume auto --set schedule.epochs={done + 10} "
           f"(or more); to start anew: another name (--set name=...) or move {run_dir} away")
    changed = changed_settings(checkpoint.get("config", {}), cfg.to_dict())
    if changed:
        raise UserError(f"run {cfg.name} in {run_dir} finished its {epochs} with other settings "
                        f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): {how}")
    raise RunFinished(f"run {cfg.name} in {run_dir} is finished ({epochs}): {how}")


def check_position(state: RunState, checkpoint: dict) -> None:
    """Refuse what a resume cannot continue from: another training set (per-sample state, the epoch's
    order), or, inside an epoch of tar shards, another batch size or number of processes."""
    saved = checkpoint.get("train_samples")
    if saved is not None and saved != state.settings.train_samples:
        raise UserError(f"cannot resume: the checkpoint's training set held {saved} samples, this config gives "
                        f"{state.settings.train_samples} (data.train_samples, data.root or the files there changed); "
                        "use another run name (name=...) to start a new run")
    partial = state.progress.partial
    dist = state.settings.dist
    if partial is None or not isinstance(state.train_loader.sampler, ShardOrderSampler):
        return
    before, now = (partial["batch_size"], partial["world_size"]), (state.cfg.data.batch_size, dist.world_size)
    if before != now:
        raise UserError(f"cannot resume inside epoch {state.progress.epoch} of tar shards with data.batch_size "
                        f"{now[0]} on {now[1]} process(es): it started with {before[0]} on {before[1]}, and each "
                        "process reads its own part of the shards; resume with those to finish the epoch "
                        "(epoch ends checkpoint too), then change them")


def restore(state: RunState, checkpoint: dict) -> None:
    """Put a run back where `checkpoint` left it: weights, optimizer, selector, RNG, progress. The LR
    schedule follows from the config and the position (no scheduler state is restored)."""
    for part in CHECKPOINT_PARTS:
        part.load(state, upgrade_partial(checkpoint) if part.key == "partial" else checkpoint.get(part.key))


def fit(state: RunState, until_epoch: Optional[int] = None, until_step: Optional[int] = None) -> Optional[dict]:
    """Train from where `state` is to the configured number of epochs; log, checkpoint, summarise.

    `until_epoch` / `until_step` stop early (after a checkpoint) and return None, as a preempted
    job would; SIGTERM/SIGUSR1 do the same and raise Preempted."""
    logger = RunLogger(state.run_dir, enabled=state.settings.dist.is_main)
    try:
        return _fit(state, logger, until_epoch, until_step)
    finally:
        logger.close()


def _fit(state: RunState, logger: RunLogger, until_epoch, until_step) -> Optional[dict]:
    cfg, dist, rt, progress = state.cfg, state.settings.dist, state.cfg.runtime, state.progress
    wall_start = time.perf_counter() - (progress.history[-1]["wall_seconds"] if progress.history else 0.0)
    with PreemptionSignals(every=rt.log_every, device=dist.device) as signals:
        for epoch in range(progress.epoch, cfg.schedule.epochs):
            if until_epoch is not None and epoch >= until_epoch:
                return None
            partial = progress.partial
            done = partial["order_done"] if partial is not None else 0
            tally = EpochTally(dist.device, state.net.num_classes, rank_tally(partial, dist), done, dist.world_size)
            resume = (progress.subset, done) if partial is not None else None
            tally.extra_selection_seconds += prepare_epoch(state.selector, state.train_loader, epoch, resume)
            progress.partial = progress.subset = None
            if partial is not None:  # this config's schedule from the first step on, not the saved lr
                rest = len(state.train_loader) * cfg.data.batch_size * dist.world_size
                state.trainer.scheduler.step_update(
                    num_updates=state.settings.step.updates_per_epoch * (epoch + done / (done + rest)))

            def after_step(tally: EpochTally, epoch: int = epoch) -> bool:
                progress.step += 1
                signum = signals.requested(progress.step)
                stop = signum or (until_step is not None and progress.step >= until_step)
                if stop or (rt.checkpoint_every and progress.step % rt.checkpoint_every == 0):
                    save_checkpoints(state, epoch, tally)
                if signum:
                    name = signal.Signals(signum).name
                    raise Preempted(signum, f"stopped by {name} at epoch {epoch}, step {progress.step}; checkpoint "
                                            f"saved in {state.location}; run the same command with --resume auto to continue")
                return bool(stop)

            bar = tqdm(total=tally.batches + len(state.train_loader), initial=tally.batches, desc=f"epoch {epoch}",
                       leave=False, dynamic_ncols=True, disable=True if not (rt.progress and dist.is_main) else None)
            stats = train_one_epoch(state.train_module, state.selector, state.train_loader, state.settings.step,
                                    state.trainer, epoch, tally,
                                    after_step, bar)
            bar.close()
            if stats is None:
                return None
            seen, bad = stats["samples_seen"], stats["bad_samples"]
            nominal = state.settings.nominal_rows
            if partial is not None:  # resumed inside the epoch, perhaps with another batch size or world size
                nominal = tally.order_total if state.train_loader.sampler.subset is None else max(nominal, seen + bad)
            stats.update(sample_accounting(stats.pop("samples_seen"), stats.pop("samples_kept"), bad, nominal))
            if dist.world_size > 1 and not rt.sync_bn:  # ranks saw different batches: average BN statistics
                distribute_bn(state.net, dist.world_size, reduce=True)
            record = {"epoch": epoch, "lr": state.trainer.optimizer.param_groups[0]["lr"], **stats}
            if (epoch + 1) % rt.eval_every == 0 or epoch == cfg.schedule.epochs - 1:
                record.update(evaluate(state.train_module, state.val_loader, state.settings.step))
                if state.trainer.ema is not None:
                    ema = evaluate(state.trainer.ema.module, state.val_loader, state.settings.step)
                    record.update(top1_ema=ema["top1"], top5_ema=ema["top5"])
            record["wall_seconds"] = time.perf_counter() - wall_start
            progress.history.append(record)
            if state.baseline is not None:
                record.update(state.baseline.compare(record, sum(r["epoch_seconds"] for r in progress.history)))
            save_checkpoints(state, epoch + 1, None, best=record.get("top1", float("-inf")) > progress.best_top1)
            if dist.is_main:
                logger.log_epoch(record)
                print(epoch_line(record), flush=True)
            barrier()

    summary = summarize(cfg, progress.history, time.perf_counter() - wall_start,
                        str(state.run_dir) if state.run_dir else None, dist.world_size, dist.device.type,
                        state.settings.class_counts)
    ranking = None if state.net.mode != "recompute" or state.score is None else vars(state.score)
    summary.update(blocking_mode=state.net.mode, blocking_mode_reason=state.mode_reason, ranking_pass=ranking)
    if dist.is_main:
        logger.write_summary(summary)
        print(f"done: top-1 {summary['top1']:.2f}%  blocked {summary['blocked_fraction']:.3f} of sample-passes  "
              f"{summary['seconds_per_epoch']:.1f} s/epoch  ({summary['run_dir']})")
    return summary


def epoch_line(record: dict) -> str:
    top1 = f"top-1 {record['top1']:.2f}%" if "top1" in record else "top-1 -"
    line = (f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  {top1}  kept {record['kept_fraction']:.3f}  "
            f"{record['epoch_seconds']:.1f}s  {record['images_per_second']:.0f} img/s")
    if record.get("selection_signal") is not None:
        line += f"  signal {record['selection_signal']:.2f}"
    if "vs_baseline_top1" in record:
        line += f"  | vs baseline: {record['vs_baseline_top1']:+.2f} pts"
    if "vs_baseline_time_saved_pct" in record:
        line += f", {record['vs_baseline_time_saved_pct']:.1f}% less time"
    return line


def sample_accounting(seen: int, kept: int, bad: int, nominal: int) -> dict:
    """What happened to the sample slots of a full-data epoch: pruned by the sampler, blocked in the
    batch, kept (full forward and backward), or unreadable (`bad_samples`, counted in the epoch
    record). Methods are compared at equal blocked_fraction; unreadable files are neither."""
    return {
        "samples_seen": seen,  # loaded and run through the shallow part
        "samples_pruned": nominal - seen - bad,  # never loaded this epoch (sampler-level selection)
        "samples_blocked": seen - kept,  # loaded, stopped after the shallow part
        "kept_fraction": kept / nominal,
        "blocked_fraction": (nominal - kept - bad) / nominal,
    }


def save_checkpoints(state: RunState, epoch: int, tally: Optional[EpochTally], best: bool = False) -> None:
    """Everything needed to go on exactly; `epoch` is the next epoch to start (tally None) or the one
    under way (tally: its progress). Collective (every rank's RNG state and tally); rank 0 writes."""
    progress = state.progress
    progress.epoch = epoch
    progress.partial = None
    if tally is not None:
        dist = state.settings.dist
        progress.partial = {"order_done": tally.order_done(), "batch_size": state.cfg.data.batch_size,
                            "world_size": dist.world_size, "ranks": all_gather_objects(tally.state_dict())}
    progress.subset = state.train_loader.sampler.subset if tally is not None else None
    checkpoint = {part.key: part.save(state) for part in CHECKPOINT_PARTS}  # rng: collective, every rank
    progress.partial = progress.subset = None  # they describe the checkpoint, not the live run
    if not state.settings.dist.is_main:
        return
    if best:
        progress.best_top1 = checkpoint["best_top1"] = progress.history[-1]["top1"]
    save_checkpoint(checkpoint, state.run_dir, best=best)


def rank_tally(partial: Optional[dict], dist: DistInfo) -> Optional[dict]:
    """This rank's share of an interrupted epoch's tallies: its own under the same world size; with
    another one, rank 0 takes the sum of every saved rank's (the epoch's totals are summed over ranks)."""
    if partial is None:
        return None
    ranks = partial["ranks"]
    if len(ranks) == dist.world_size:
        return ranks[dist.rank]
    return EpochTally.merge(ranks) if dist.is_main else None


def upgrade_partial(checkpoint: dict) -> Optional[dict]:
    """The `partial` entry in today's form: checkpoints of earlier versions held rank 0's tally alone,
    with the position in batches."""
    partial = checkpoint.get("partial")
    if partial is None or "ranks" in partial:
        return partial
    batch_size, world_size = checkpoint["config"]["data"]["batch_size"], len(checkpoint["rng"])
    return {"order_done": partial["batches"] * batch_size * world_size, "batch_size": batch_size,
            "world_size": world_size, "ranks": [partial] * world_size}


def summarize(cfg: Config, history: list[dict], wall_seconds: float, run_dir, world_size: int, device: str,
              class_counts: Optional[list] = None) -> dict:
    slots = sum(r["samples_seen"] + r["samples_pruned"] + r.get("bad_samples", 0) for r in history)
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
        "selection_seconds": sum(r["selection_seconds"] for r in history),
        "bad_samples": sum(r["bad_samples"] for r in history),
        "nonfinite_steps": sum(r["nonfinite_steps"] for r in history),
        "world_size": world_size,
        "device": device,
        "wall_seconds": wall_seconds,
        "seconds_per_epoch": sum(r["epoch_seconds"] for r in history) / len(history),
        "run_dir": run_dir,
        "train_class_counts": list(class_counts) if class_counts is not None else None,  # training samples per class (long-tailed sets: head vs tail)
    }
