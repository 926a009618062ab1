"""Wire config -> data, model, selector, optimizer, schedule -> epochs -> run directory."""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from pfb_train.checkpoint import save_atomic, training_state
from pfb_train.config import Config, save_config
from pfb_train.data import build_datasets, build_loaders
from pfb_train.distributed import barrier, cleanup, init_distributed
from pfb_train.errors import UserError
from pfb_train.engine import StepContext, evaluate, train_one_epoch
from pfb_train.metrics import RunLogger, make_run_dir
from pfb_train.models import build_model
from pfb_train.selection import selector_from_config

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config) -> dict:
    """Train one run as configured; returns the summary written to summary.json."""
    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'runtime.device' is 'cuda' but no CUDA device is available")
    dist = init_distributed(cfg.runtime.device)
    try:
        return _run(cfg, dist)
    finally:
        cleanup()


def _run(cfg: Config, dist) -> dict:
    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    seed_everything(rt.seed)  # same model init on every rank; data order comes from the sampler's seed
    device = dist.device

    splits = build_datasets(cfg.data, cfg.model.num_classes, seed=rt.seed)
    train_loader, val_loader = build_loaders(splits, cfg.data, rt.seed, dist.rank, dist.world_size,
                                             pin_memory=device.type == "cuda")
    blocked = build_model(cfg.model, cfg.blocking.stage, splits.num_classes).to(device)
    if rt.channels_last:
        blocked = blocked.to(memory_format=torch.channels_last)
    model = blocked
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(blocked, device_ids=[device.index] if device.type == "cuda" else None)
    selector = selector_from_config(cfg)

    o, s = cfg.optim, cfg.schedule
    optimizer = create_optimizer_v2(blocked, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.name, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                                       warmup_lr=s.warmup_lr, min_lr=s.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    amp_dtype = AMP_DTYPES[rt.amp]
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                      label_smoothing=o.label_smoothing, num_classes=splits.num_classes)
    ctx = StepContext(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16"), device,
                      amp_dtype, rt.channels_last, o.label_smoothing, o.clip_grad, mixup, rt.log_every)

    run_dir = make_run_dir(rt.output, cfg.name) if dist.is_main else None
    logger = RunLogger(run_dir, enabled=dist.is_main)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"run {cfg.name}: {cfg.model.name} split after {blocked.stage_name} (stage {blocked.stage}), "
              f"blocking {cfg.blocking.method} ratio {cfg.blocking.ratio}, {len(train_loader)} steps/epoch, "
              f"{dist.world_size} process(es) on {device.type} -> {run_dir}")

    step, best_top1, history = 0, float("-inf"), []
    wall_start = time.perf_counter()
    for epoch in range(s.epochs):
        train_loader.sampler.set_epoch(epoch)
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=True if not (rt.progress and dist.is_main) else None)  # None: off when not a TTY
        stats = train_one_epoch(model, selector, train_loader, ctx, epoch, step, progress=bar)
        bar.close()
        step = stats.pop("step")
        scheduler.step(epoch + 1)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **stats}
        last = epoch == s.epochs - 1
        if (epoch + 1) % rt.eval_every == 0 or last:
            record.update(evaluate(model, val_loader, ctx))
        record["wall_seconds"] = time.perf_counter() - wall_start
        history.append(record)
        if dist.is_main:
            logger.log_epoch(record)
            state = training_state(blocked, optimizer, scheduler, ctx.scaler, selector, epoch, step, cfg.to_dict())
            save_atomic(state, run_dir / "checkpoint-last.pt")
            if record.get("top1", float("-inf")) > best_top1:
                best_top1 = record["top1"]
                save_atomic(state, run_dir / "checkpoint-best.pt")
            top1 = f"top-1 {record['top1']:.2f}%" if "top1" in record else "top-1 -"
            print(f"epoch {epoch}: loss {record['train_loss']:.4f}  {top1}  kept {record['kept_fraction']:.3f}  "
                  f"{record['epoch_seconds']:.1f}s  {record['images_per_second']:.0f} img/s", flush=True)
        barrier()

    summary = summarize(cfg, history, time.perf_counter() - wall_start, str(run_dir) if run_dir else None)
    if dist.is_main:
        logger.write_summary(summary)
        logger.close()
        print(f"done: top-1 {summary['top1']:.2f}%  blocked {summary['blocked_fraction']:.3f} of sample-passes  "
              f"{summary['seconds_per_epoch']:.1f} s/epoch  ({summary['run_dir']})")
    return summary


def summarize(cfg: Config, history: list[dict], wall_seconds: float, run_dir) -> dict:
    seen = sum(r["samples_seen"] for r in history)
    blocked = sum(r["samples_blocked"] for r in history)
    evaluated = [r for r in history if "top1" in r]
    return {
        "name": cfg.name,
        "method": cfg.blocking.method,
        "ratio": cfg.blocking.ratio,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "epochs": len(history),
        "top1": evaluated[-1]["top1"],
        "top5": evaluated[-1]["top5"],
        "best_top1": max(r["top1"] for r in evaluated),
        "blocked_fraction": blocked / max(seen, 1),
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "wall_seconds": wall_seconds,
        "seconds_per_epoch": sum(r["epoch_seconds"] for r in history) / len(history),
        "run_dir": run_dir,
    }
