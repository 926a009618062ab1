"""What `pfb-train info` reports: the split, the shallow FLOP share, the predicted saving."""

from __future__ import annotations

import torch

from pfb_train.costs import MODES, blocking_mode, cheaper_mode, count_flops, predicted_cost_ratio, shallow_flop_share
from pfb_train.data.registry import get_source
from pfb_train.models import build_model, split_spec
from pfb_train.selection import get_method


def _num_classes(cfg) -> int:
    """model.num_classes, else the data source's count as known without reading the data."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    return get_source(cfg.data.dataset).num_classes(cfg.data)


def model_info(cfg) -> dict:
    model_cfg = type(cfg.model)(**{**vars(cfg.model), "pretrained": False})  # no weights needed to count
    with torch.device("meta"):  # shapes only: FLOPs are counted without doing the arithmetic
        blocked = build_model(model_cfg, cfg.blocking.stage, _num_classes(cfg), blocking_mode(cfg.blocking),
                              img_size=cfg.data.img_size).eval()
    share = shallow_flop_share(blocked, cfg.data.img_size)
    x = torch.empty(1, 3, cfg.data.img_size, cfg.data.img_size, device="meta")
    with torch.no_grad():
        flops = count_flops(lambda: blocked(x))
    batch = cfg.data.batch_size
    method = get_method(cfg.blocking.method)
    fraction = method.blocked_fraction_per_batch(cfg.blocking.chosen())
    blocked_rows = round(fraction * batch)  # 0 unless rows are blocked
    score = blocked.resolve_score(method.score_pass(cfg.blocking.chosen()), cfg.data.img_size)
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
        "blocked_rows": blocked_rows,  # rows blocked in each batch
        "mode": mode,
        "score_scale": score.scale,  # recompute mode's ranking pass
        "score_norm": score.norm,
        "predicted_ratio": {mode: predicted_cost_ratio(mode, share, realised, score.scale) for mode in MODES},
    }
