"""Time training steps of full data (`none`) against a blocking method on one fixed batch.

Same model initialisation, same synthetic batch, same optimizer; each step is the harness's
own `engine.train_step`. Warm-up steps first, then `--repeats` timed runs of `--steps` steps
(device-synchronised); the median step time of each is reported. One more run of `--steps`
steps is split into phases by the harness's PhaseTimer (CUDA events on a GPU): the selection's
share of the step (`select` + `observe`) is reported as `selection_share`. FLOPs per step are
counted on the meta device with torch's FlopCounterMode, and the cost model's prediction is
given next to both ratios. `--score-scale` / `--score-norm` set recompute mode's ranking pass
(blocking.pfb.score_scale / score_norm); `score_pass_share` is its share of the blocked step (the
`shallow` phase). Prints one JSON object.

    python scripts/bench_step.py --model resnet50 --ratio 0.4 --device cuda --amp bf16 --channels-last \
        --score-scale 0.5 --score-norm running
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

from pfb_train.calibrate import measure_part_times, sync
from pfb_train.costs import (
    cheaper_mode,
    predicted_cost_ratio,
    predicted_time_ratio,
    shallow_flop_share,
    step_flops,
    timed_cheaper_mode,
)
from pfb_train.engine import Batch, Optimization, StepContext, StepSettings, train_step
from pfb_train.timing import PhaseTimer
from pfb_train.models import split_model
from pfb_train.selection.score_pass import ScorePass
from pfb_train.selection import build_selector
from pfb_train.train import AMP_DTYPES


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--stage", default="1")
    p.add_argument(
        "--mode",
        choices=["auto", "reuse", "recompute"],
        default="auto",
        help="auto: the cheaper by the part times measured here (by FLOPs on the CPU), as blocking.mode: auto",
    )
    p.add_argument("--score-scale", type=float, default=1.0, help="pfb: ranking pass at this resolution factor")
    p.add_argument(
        "--score-norm",
        choices=["batch", "running"],
        default="batch",
        help="pfb: ranking pass normalised by batch or running statistics",
    )
    p.add_argument("--method", choices=["pfb", "random"], default="pfb")
    p.add_argument(
        "--stratify",
        choices=["none", "label", "percentile"],
        default=None,
        help="pfb: blocking.pfb.stratify (default: the option's default); the labels are 1000 classes",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--centres", type=int, default=64, help="pfb centres (at most the batch size)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--no-check-finite",
        dest="check_finite",
        action="store_false",
        help="drop the non-finite-gradient guard (runtime.check_finite: false): its one host sync per step",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the shallow and deep parts (runtime.compile)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="write torch.profiler tables of one full and one blocked step to DIR/profile_<method>.txt",
    )
    return p.parse_args()


def profile_steps(batch: Batch, context: StepContext, done: int, path: Path, steps: int = 3) -> None:
    """Kernel table of a few steps, sorted by device time: where a blocked step's time goes."""
    device = context.settings.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            train_step(batch, context, done + i + 1)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))


def time_steps(blocked, selector, x, y, args, device, method: str) -> tuple[list[float], dict]:
    """Seconds per step of each timed repeat, and the seconds per phase of one more run."""
    optimizer = torch.optim.SGD(blocked.parameters(), lr=0.01, momentum=0.9)
    amp = AMP_DTYPES[args.amp]
    settings = StepSettings(device, amp, check_finite=args.check_finite)  # x is in its memory format already
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    context = StepContext(blocked, selector, settings, Optimization(optimizer, None, scaler))
    batch = Batch(x, y, torch.arange(x.shape[0], device=device))
    blocked.train()
    done = 0  # steps so far
    for _ in range(args.warmup):
        train_step(batch, context, done + 1)
        done += 1
    per_step = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(batch, context, done + 1)
            done += 1
        sync(device)
        per_step.append((time.perf_counter() - start) / args.steps)
    timer = PhaseTimer(device)
    for _ in range(args.steps):
        timer.reset_clock()
        train_step(batch, context, done + 1, timer)
        done += 1
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile_steps(batch, context, done, Path(args.profile) / f"profile_{method}.txt")
    return per_step, timer.totals()


def main() -> None:
    args = parse_args()
    score = ScorePass(args.score_scale, args.score_norm)
    amp = AMP_DTYPES[args.amp]
    auto = args.mode == "auto"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the harness sets it (runtime.cudnn_benchmark)
    stage = int(args.stage) if args.stage.isdigit() else args.stage
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=1000)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format
    )
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    # The parts' seconds, eagerly, on the untrained copy: what blocking.mode auto weighs on a GPU.
    parts = measure_part_times(
        split_model(copy.deepcopy(base), stage).to(device, memory_format=memory_format),
        x,
        args.ratio,
        amp,
        score,
        warmup=3,
        repeats=10,
    )
    if auto:
        args.mode = timed_cheaper_mode(parts) if device.type == "cuda" else cheaper_mode(args.ratio, args.score_scale)
    results, phases = {}, {}
    for method in ("none", args.method):
        blocked = split_model(copy.deepcopy(base), stage, args.mode).to(device, memory_format=memory_format)
        if args.compile:
            blocked.compile_parts()
        options = {} if method == "none" else {"ratio": args.ratio}
        if method == "pfb":
            options.update(
                centres=min(args.centres, args.batch_size), score_scale=args.score_scale, score_norm=args.score_norm
            )
            if args.stratify is not None:
                options["stratify"] = args.stratify
        selector = build_selector(method, num_classes=1000, **options)
        results[method], phases[method] = time_steps(blocked, selector, x, y, args, device, method)

    with torch.device("meta"):
        meta = split_model(timm.create_model(args.model, num_classes=1000), stage, args.mode)
    share = shallow_flop_share(meta, args.img_size)
    xm = torch.empty(args.batch_size, 3, args.img_size, args.img_size, device="meta")
    kept = args.batch_size - round(args.ratio * args.batch_size)
    flop_ratio = step_flops(meta, xm, kept, score) / step_flops(meta, xm, None)
    realised = 1 - kept / args.batch_size

    t_none, t_blocked = statistics.median(results["none"]), statistics.median(results[args.method])
    timed = phases[args.method]
    selection_share = (timed.get("select", 0.0) + timed.get("observe", 0.0)) / sum(timed.values())
    print(
        json.dumps(
            {
                "model": args.model,
                "method": args.method,
                "stratify": getattr(selector, "stratify", None),
                "mode": args.mode,
                "mode_auto": auto,
                "stage": meta.stage_name,
                "score_scale": args.score_scale,
                "score_norm": args.score_norm,
                "ratio": args.ratio,
                "blocked_rows": args.batch_size - kept,
                "batch_size": args.batch_size,
                "img_size": args.img_size,
                "amp": args.amp,
                "channels_last": args.channels_last,
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"cpu x{torch.get_num_threads()} ({platform.processor() or platform.machine()})",
                "torch": torch.__version__,
                "timm": timm.__version__,
                "step_ms_none": 1000 * t_none,
                f"step_ms_{args.method}": 1000 * t_blocked,
                "time_ratio": t_blocked / t_none,
                "flop_ratio": flop_ratio,
                "predicted_ratio": predicted_cost_ratio(args.mode, share, realised, args.score_scale),
                "predicted_ratio_ideal": predicted_cost_ratio("ideal", share, realised),
                "shallow_share": share,
                "shallow_time_share": parts.shallow_share,
                "shallow_fwd_bwd_ms": 1e3 * parts.shallow,
                "model_fwd_bwd_ms": 1e3 * parts.full,
                "score_pass_ms": 1e3 * parts.score,
                "predicted_ratio_timed": predicted_time_ratio(
                    args.mode, parts
                ),  # what blocking.mode auto weighs on a GPU
                "fwd_bwd_ratio_timed": {m: predicted_time_ratio(m, parts) for m in ("reuse", "recompute")},
                # recompute: the `shallow` phase is the ranking pass; reuse: the training pass's shallow forward
                "score_pass_share": timed.get("shallow", 0.0) / sum(timed.values())
                if args.mode == "recompute"
                else 0.0,
                "selection_share": selection_share,
                "phase_ms": {k: round(1000 * v / args.steps, 3) for k, v in timed.items()},
                "check_finite": args.check_finite,
                "compile": args.compile,
                "images_per_second_none": args.batch_size / t_none,
                "repeats_ms_none": [round(1000 * t, 2) for t in results["none"]],
                f"repeats_ms_{args.method}": [round(1000 * t, 2) for t in results[args.method]],
            }
        )
    )


if __name__ == "__main__":
    main()
