"""What `pfb-train info` reports: the split, the shallow FLOP share, the predicted saving."""

from __future__ import annotations

import torch

from pfb_train.budget import budget_epochs
from pfb_train.config import peak_lr, step_rows
from pfb_train.costs import (
    MODES,
    StepCost,
    blocking_mode,
    cheaper_mode,
    count_flops,
    predicted_cost_ratio,
    shallow_flop_share,
)
from pfb_train.data.registry import get_source
from pfb_train.models import build_model, split_spec
from pfb_train.selection import RunFacts, get_method


def _num_classes(cfg) -> int:
    """model.num_classes, else the data source's count as known without reading the data."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    return get_source(cfg.data.dataset).num_classes(cfg.data)


def model_info(cfg) -> dict:
    model_cfg = type(cfg.model)(**{**vars(cfg.model), "pretrained": False})  # no weights needed to count
    with torch.device("meta"):  # shapes only: FLOPs are counted without doing the arithmetic
        blocked = build_model(
            model_cfg, cfg.blocking.stage, _num_classes(cfg), blocking_mode(cfg.blocking), img_size=cfg.data.img_size
        ).eval()
    share = shallow_flop_share(blocked, cfg.data.img_size)
    x = torch.empty(1, 3, cfg.data.img_size, cfg.data.img_size, device="meta")
    with torch.no_grad():
        flops = count_flops(lambda: blocked(x))
    batch = cfg.data.batch_size
    method = get_method(cfg.blocking.method)
    fraction = method.blocked_fraction_per_batch(cfg.blocking.chosen())
    blocked_rows = round(fraction * batch)  # 0 unless rows are blocked
    score = blocked.resolve_score(method.score_pass(cfg.blocking.chosen()), cfg.data.img_size)
    assert score.scale is not None  # resolved
    mode = blocked.mode  # as set, or auto by the FLOP model with the ranking pass this model takes
    if cfg.blocking.mode == "auto":
        mode = cheaper_mode(fraction, score.scale) if fraction > 0 else "reuse"
    realised = blocked_rows / batch
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {
        "model": cfg.model.name,
        "params": count(blocked),
        "shallow_params": count(blocked.shallow),
        "deep_params": count(blocked.deep),
        "stage": blocked.stage,
        "stage_name": blocked.stage_name,
        "num_stages": len(split_spec(blocked.model).stages),
        "img_size": cfg.data.img_size,
        "gflops_per_image": flops / 1e9,
        "shallow_share": share,
        "method": cfg.blocking.method,
        "level": method.level,
        "ratio": method.ratio(cfg.blocking.chosen()),
        "batch_size": batch,
        "accum_steps": cfg.optim.accum_steps,
        "lr_one_process": peak_lr(cfg.optim, step_rows(cfg)),  # the peak LR at one process's global batch
        "blocked_rows": blocked_rows,  # rows blocked in each batch
        "mode": mode,
        "score_scale": score.scale,  # recompute mode's ranking pass
        "score_norm": score.norm,
        "predicted_ratio": {mode: predicted_cost_ratio(mode, share, realised, score.scale) for mode in MODES},
        **budget_info(cfg, method, mode, share, score.scale),
    }


# Sampler-level methods say only how small an epoch's subset can get (Selector.fewest_samples); asked of a
# set this large, that is a fraction.
LARGE_SET = 1_000_000


def budget_info(cfg, method, mode: str, share: float, score_scale: float) -> dict:
    """What schedule.budget buys: `budget_epochs`, the epochs a compute budget trains with the configured
    method (budget.budget_epochs: a batch-level method's blocked ratio over its window, in schedule epochs,
    at the cost model's price in `mode`). A run switches windows at epoch starts, not at their exact
    position, so it may train up to about one epoch more or less than this. `budget_epochs_bound` True where
    it is an upper bound (a sampler-level method: its smallest subset all run long). Nothing without a
    budget; None for a seconds budget (the machine decides)."""
    s = cfg.schedule
    if s.budget is None:
        return {}
    if s.budget_unit == "seconds":
        return {"budget_epochs": None, "budget_epochs_bound": False}
    options, batch = cfg.blocking.chosen(), cfg.data.batch_size
    if method.level == "sampler":
        selector = method.build(options, RunFacts(epochs=s.epochs, batch_size=batch, seed=cfg.runtime.seed))
        smallest = selector.fewest_samples(LARGE_SET) / LARGE_SET
        return {"budget_epochs": s.budget / smallest, "budget_epochs_bound": smallest < 1}
    window = options.schedule(s.epochs) if hasattr(options, "schedule") else None  # WindowOptions
    step_cost = StepCost(mode, share, score_scale if mode == "recompute" else 1.0)

    def cost_at(t: float) -> float:
        ratio = method.blocked_fraction_per_batch(options) if window is None else window.ratio_at(t)
        if method.level != "batch" or ratio <= 0:
            return 1.0
        return step_cost(batch, batch - round(ratio * batch), True)

    return {"budget_epochs": budget_epochs(s.budget, s.epochs, cost_at), "budget_epochs_bound": False}
