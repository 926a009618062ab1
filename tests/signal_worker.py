"""Run by tests/test_faults.py: the CLI, sending itself SIGTERM at a chosen moment.

    signal_worker.py first_step|evaluation -- CLI ARGS...
"""

import os
import signal
import sys

from pfb_train import cli, engine, train

moment = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1:]
fired = []


def fire():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)


if moment == "first_step":
    real_step = engine.train_step

    def train_step(*a, **k):
        fire()
        return real_step(*a, **k)

    engine.train_step = train_step
else:
    real_evaluate = train.evaluate

    def evaluate(*a, **k):
        fire()
        return real_evaluate(*a, **k)

    train.evaluate = evaluate

sys.exit(cli.main(args))
