"""Run by tests/test_faults.py: the CLI, with SIGTERM sent at a chosen moment.

    signal_worker.py first_step|evaluation|step=N -- CLI ARGS...

`first_step` and `evaluation` signal the process itself. `step=N`: rank 0, as its N-th training step
(counted from 1 in this launch) begins, signals torchrun (its parent), which signals every rank's
process group, DataLoader workers included, as a cluster's preemption does; then waits a second,
so every rank has the signal before the step's collectives let the other ranks go on.
"""

import os
import signal
import sys
import time

from pfb_train import cli, engine, train

moment = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1 :]
under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
fired = []


def fire():
    if not fired:
        fired.append(1)
        os.kill(os.getppid() if under_torchrun else os.getpid(), signal.SIGTERM)
        if under_torchrun:
            time.sleep(1.0)


if moment == "evaluation":
    real_evaluate = train.evaluate

    def evaluate(*a, **k):
        fire()
        return real_evaluate(*a, **k)

    train.evaluate = evaluate
else:
    at_step = 1 if moment == "first_step" else int(moment.removeprefix("step="))
    real_step, steps = engine.train_step, []

    def train_step(*a, **k):
        steps.append(1)
        if len(steps) == at_step and int(os.environ.get("RANK", 0)) == 0:
            fire()
        return real_step(*a, **k)

    engine.train_step = train_step

sys.exit(cli.main(args))
