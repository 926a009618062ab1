"""Run under torchrun by tests/test_methods_contract.py: trains each method named on the command line
in turn (the small-run settings of that test), once through and once stopped inside its second epoch
then resumed, and writes what each rank holds to OUT/<method>_rank<r>.pt and OUT/<method>_cut_rank<r>.pt."""

import sys

import torch

from pfb_train.config import load_config
from pfb_train.distributed import cleanup, init_distributed
from pfb_train.train import fit, setup
from helpers import BATCH, SAMPLES, overrides


def train(method: str, out: str, name: str, dist, **until) -> None:
    # In a function, so the DDP model is gone before the process group is destroyed.
    resume = ["runtime.resume=auto"] if name.endswith("_cut") else []
    state = setup(load_config(None, [*overrides(method, out, name), "runtime.threads=1", *resume]), dist)
    summary = fit(state, **until)
    if summary is not None:
        torch.save(
            {"model": state.net.state_dict(), "selector": state.selector.state_dict(), "summary": summary},
            f"{out}/{name}_rank{dist.rank}.pt",
        )


dist = init_distributed("cpu")
try:
    for method in sys.argv[2:]:
        train(method, sys.argv[1], method, dist)
        train(method, sys.argv[1], f"{method}_cut", dist, until_step=SAMPLES // (2 * BATCH) + 2)
        train(method, sys.argv[1], f"{method}_cut", dist)
finally:
    cleanup()
