"""`blocking.mode: auto` on a GPU: time the model's parts on this device, then pick the cheaper mode.

FLOP shares misweigh the parts on a GPU: in bf16 the step is dominated by memory-bound
normalisation kernels, so resnet50's stem + layer1 take 47 % of the step's time for 19 % of its
FLOPs on an H200 (docs/BENCHMARKS.md). So at start-up a few forward+backward passes of a full
and of a blocked step in each mode, on a random batch of the run's shape, dtype and memory format,
replace the FLOP model (`costs.PartTimes`, `costs.predicted_time_ratio`). On the CPU the FLOP model
stays (`costs.blocking_mode`): there the time shares roughly follow the FLOPs, and step times vary
by up to 35 % between repeats on a loaded machine, more than the modes differ.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

from pfb_train.costs import PartTimes, cheaper_mode, predicted_time_ratio, timed_cheaper_mode
from pfb_train.distributed import broadcast, is_distributed
from pfb_train.models import BlockedModel, kept_norm_stats, tracking_norms
from pfb_train.selection.score_pass import EXACT_SCORE, ScorePass
from pfb_train.selection import get_method


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` device-synchronised calls, after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_part_times(
    blocked: BlockedModel,
    x: torch.Tensor,
    ratio: float,
    amp_dtype: Optional[torch.dtype] = None,
    score: ScorePass = EXACT_SCORE,
    warmup: int = 2,
    repeats: int = 5,
) -> PartTimes:
    """Seconds of one batch `x` (B, C, H, W) through forward + backward of: the whole model, a step
    blocking `ratio` of the rows in each mode, the shallow part alone; and the ranking pass (`score`).
    The model comes back as it was: weights, mode, BatchNorm statistics and RNG states untouched,
    gradients cleared."""
    device = x.device
    cast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    keep = torch.arange(x.shape[0] - round(ratio * x.shape[0]), device=device)  # which rows: no matter for time
    was_training, was_mode = blocked.training, blocked.mode
    blocked.train()
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        kept_norm_stats(tracking_norms(blocked.model)),
    ):
        with torch.no_grad(), cast():
            grad_h = torch.randn_like(blocked.shallow(x))

        def shallow():
            with cast():
                h = blocked.shallow(x)
            h.backward(grad_h)

        def full():
            with cast():
                out = blocked.deep(blocked.shallow(x))
            out.float().sum().backward()

        def step_in(mode):
            def step():
                blocked.mode = mode
                with cast():
                    out = blocked(x, select=lambda feats: keep, score=score)
                out.logits.float().sum().backward()

            return step

        def score_pass():
            with cast():
                blocked.score_features(x, score)

        seconds = functools.partial(median_seconds, device=device, warmup=warmup, repeats=repeats)
        try:
            times = PartTimes(
                full=seconds(full),
                reuse=seconds(step_in("reuse")),
                recompute=seconds(step_in("recompute")),
                shallow=seconds(shallow),
                score=seconds(score_pass),
            )
        finally:
            blocked.zero_grad(set_to_none=True)
            blocked.train(was_training)
            blocked.mode = was_mode
    return times


class ModeChoice(NamedTuple):
    mode: str  # reuse | recompute
    reason: str  # one phrase for the run line and summary.json
    times: Optional[PartTimes]  # what was measured (None: decided by FLOPs or set in the config)


def choose_mode(
    blocked: BlockedModel,
    batch_shape: tuple,
    ratio: float,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    score: ScorePass = EXACT_SCORE,
    warmup: int = 2,
    repeats: int = 5,
) -> ModeChoice:
    """The mode whose blocked step (blocking `ratio` of batches of `batch_shape` (B, C, H, W)) is
    faster, timed on the model's device (`measure_part_times`)."""
    device = next(blocked.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    noise = torch.Generator(device).manual_seed(0)  # its own stream: the run's RNG draws stay as they were
    x = torch.randn(batch_shape, device=device, generator=noise).contiguous(memory_format=memory_format)
    times = measure_part_times(blocked, x, ratio, amp_dtype, score, warmup, repeats)
    reuse, recompute = (predicted_time_ratio(m, times) for m in ("reuse", "recompute"))
    reason = (
        f"auto, timed on {device.type}: reuse {reuse:.2f}, recompute {recompute:.2f} of a full step's "
        f"forward+backward (shallow part {times.shallow_share:.0%} of its time)"
    )
    return ModeChoice(timed_cheaper_mode(times), reason, times)


def resolve_mode(cfg, blocked: BlockedModel, amp_dtype: Optional[torch.dtype] = None) -> ModeChoice:
    """`blocking.mode` for a run whose model is already on its device: as set, or (auto) timed on a
    GPU, or by the FLOP model on the CPU. Under DDP every rank takes rank 0's choice."""
    b, d = cfg.blocking, cfg.data
    method, options = get_method(b.method), b.chosen()
    blocked_fraction = method.blocked_fraction_per_batch(options)
    score = blocked.resolve_score(method.score_pass(options), d.img_size)
    assert score.scale is not None  # resolved
    if b.mode != "auto":
        return ModeChoice(b.mode, "set in the config", None)
    if blocked_fraction == 0:
        return ModeChoice("reuse", f"auto: {b.method} blocks no rows in the batch", None)
    device = next(blocked.parameters()).device
    if device.type != "cuda":
        mode = cheaper_mode(blocked_fraction, score.scale)
        reason = (
            f"auto, FLOP model: blocking {blocked_fraction} {'>' if mode == 'recompute' else '<='} "
            f"{score.scale**2 / 3:.3f}"
        )
        return ModeChoice(mode, reason, None)
    choice = choose_mode(
        blocked,
        (d.batch_size, blocked.in_chans, d.img_size, d.img_size),
        blocked_fraction,
        amp_dtype,
        cfg.runtime.channels_last,
        score,
    )
    if is_distributed():
        modes = ("reuse", "recompute")
        chosen = modes[int(broadcast(torch.tensor([modes.index(choice.mode)], device=device)).item())]
        choice = choice._replace(mode=chosen)
    return choice
