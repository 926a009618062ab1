"""Run under torchrun (or plain python for one process) by tests/test_distributed.py.

Evaluates the freshly initialised model, optionally trains, and writes what each rank holds
to OUT/rank<r>.pt so the test can compare ranks and world sizes.
"""

import sys

import torch

from pfb_train.config import load_config
from pfb_train.distributed import cleanup, init_distributed
from pfb_train.engine import evaluate
from pfb_train.train import fit, setup


def main(config, out, do_fit, overrides, dist):
    # In a function, so the DDP model is gone before the process group is destroyed.
    state = setup(load_config(config, [f"runtime.output={out}/runs", *overrides]), dist)
    result = {
        "initial_eval": evaluate(state.train_module, state.val_loader, state.settings.step_settings),
        "world_size": dist.world_size,
    }
    if do_fit:
        result["summary"] = fit(state)
        result["model"] = state.net.state_dict()
        result["selector"] = state.selector.state_dict()
        # the last step's gradients (kept after the update) and the EMA's BatchNorm statistics
        result["grad_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in state.net.parameters() if p.grad is not None]
        ).item()
        if state.optimization.ema is not None:
            result["ema_buffers"] = {
                k: v.clone() for k, v in state.optimization.ema.module.named_buffers() if v.is_floating_point()
            }
    torch.save(result, f"{out}/rank{dist.rank}.pt")


dist = init_distributed("cpu")
try:
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "fit", sys.argv[4:], dist)
finally:
    cleanup()
