"""What `pfb-train info` reports: the split, the shallow FLOP share, the predicted saving."""

from __future__ import annotations

from pathlib import Path

import torch

from pfb_train.costs import MODES, blocking_mode, count_flops, predicted_cost_ratio, shallow_flop_share
from pfb_train.models import build_model, split_spec
from pfb_train.selection import get_method


def _num_classes(cfg) -> int:
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if cfg.data.dataset == "imagefolder" and cfg.data.root and Path(cfg.data.root, "train").is_dir():
        return sum(1 for p in Path(cfg.data.root, "train").iterdir() if p.is_dir())
    return 1000 if cfg.data.dataset == "imagefolder" else 10


def model_info(cfg) -> dict:
    model_cfg = type(cfg.model)(**{**vars(cfg.model), "pretrained": False})  # no weights needed to count
    with torch.device("meta"):  # shapes only: FLOPs are counted without doing the arithmetic
        blocked = build_model(model_cfg, cfg.blocking.stage, _num_classes(cfg), blocking_mode(cfg.blocking)).eval()
    share = shallow_flop_share(blocked, cfg.data.img_size)
    x = torch.empty(1, 3, cfg.data.img_size, cfg.data.img_size, device="meta")
    with torch.no_grad():
        flops = count_flops(lambda: blocked(x))
    batch = cfg.data.batch_size
    method = get_method(cfg.blocking.method)
    blocked_rows = round(method.blocked_per_batch(cfg.blocking.chosen()) * batch)  # 0 unless rows are blocked
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
        "blocked_per_batch": blocked_rows,
        "mode": blocked.mode,
        "predicted_ratio": {mode: predicted_cost_ratio(mode, share, realised) for mode in MODES},
    }
