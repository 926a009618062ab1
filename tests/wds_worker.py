"""Run under torchrun (or plain python for one process) by tests/test_wds.py and tests/test_dali.py:
the sample indices each rank's train loader yields in epochs 0 and 1, each sample's pixel sum, and the
validation count, to OUT/rank<r>.pt. Arguments after OUT are more config overrides."""

import sys

import torch

from pfb_train.config import load_config
from pfb_train.data import set_loader_epoch
from pfb_train.distributed import cleanup, init_distributed
from pfb_train.engine import evaluate
from pfb_train.train import setup


def main(shards, out, dist, extra):
    cfg = load_config(
        None,
        [
            "model.name=test_resnet",
            "model.num_classes=null",
            "data.dataset=wds",
            f"data.root={shards}",
            "data.img_size=16",
            "data.batch_size=4",
            "data.workers=1",
            "runtime.device=cpu",
            "runtime.progress=false",
            "runtime.seed=0",
            "runtime.threads=1",
            f"runtime.output={out}/runs",
            "blocking.method=none",
            *extra,
        ],
    )
    state = setup(cfg, dist)
    epochs, pixel_sums = [], {}
    for epoch in range(2):
        set_loader_epoch(state.train_loader, epoch)
        epochs.append([])
        for images, _, indices in state.train_loader:
            epochs[-1].append(indices.tolist())
            pixel_sums.update(
                {(epoch, i): s for i, s in zip(indices.tolist(), images.double().sum((1, 2, 3)).tolist())}
            )
    result = evaluate(state.train_module, state.val_loader, state.settings.step_settings)
    torch.save(
        {"epochs": epochs, "pixel_sums": pixel_sums, "val_samples": result["val_samples"]}, f"{out}/rank{dist.rank}.pt"
    )


dist = init_distributed("cpu")
try:
    main(sys.argv[1], sys.argv[2], dist, sys.argv[3:])
finally:
    cleanup()
