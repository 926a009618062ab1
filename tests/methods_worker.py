"""Run under torchrun by tests/test_methods_contract.py: trains each method named on the command line
in turn (the small-run settings of that test) and writes what each rank holds to OUT/<method>_rank<r>.pt."""

import sys

import torch

from pfb_train.config import load_config
from pfb_train.distributed import cleanup, init_distributed
from pfb_train.train import fit, setup
from test_methods_contract import overrides


def train(method: str, out: str, dist) -> None:
    # In a function, so the DDP model is gone before the process group is destroyed.
    state = setup(load_config(None, [*overrides(method, out, method), "runtime.threads=1"]), dist)
    summary = fit(state)
    torch.save({"model": state.net.state_dict(), "selector": state.selector.state_dict(), "summary": summary},
               f"{out}/{method}_rank{dist.rank}.pt")


dist = init_distributed("cpu")
try:
    for method in sys.argv[2:]:
        train(method, sys.argv[1], dist)
finally:
    cleanup()
