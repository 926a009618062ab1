"""Run under torchrun by tests/test_faults.py: the CLI, with one fault injected on one rank only.

    fault_worker.py FAULT RANK -- CLI ARGS...
FAULT: `data` (the train loader raises an unreadable-batch UserError at its 3rd batch) or
`bug` (the training step raises a plain exception at step 3). Exits with the CLI's exit code.
"""

import os
import sys

from pfb_train import cli, engine, train
from pfb_train.errors import UserError

fault, faulty_rank = sys.argv[1], int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1:]

if int(os.environ.get("RANK", 0)) == faulty_rank:
    if fault == "data":
        real_build = train.build_loaders

        def build_loaders(*a, **k):
            loader, val = real_build(*a, **k)

            class Faulty(type(loader)):
                def __iter__(self):
                    for i, batch in enumerate(super().__iter__()):
                        if i == 2:
                            raise UserError("all 8 images of a batch are unreadable, e.g. /data/bad.jpg")
                        yield batch

            loader.__class__ = Faulty
            return loader, val

        train.build_loaders = build_loaders
    elif fault == "bug":
        real_step, calls = engine.train_step, []

        def train_step(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise ZeroDivisionError("injected")
            return real_step(*a, **k)

        engine.train_step = train_step

sys.exit(cli.main(args))
