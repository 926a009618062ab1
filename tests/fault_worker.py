"""Run under torchrun by tests/test_faults.py: the CLI, with one fault injected on one rank only.

    fault_worker.py FAULT RANK -- CLI ARGS...
FAULT: `data` (the train loader raises an unreadable-batch UserError at its 3rd batch) or
`bug` (the training step raises a plain exception at step 3). Exits with the CLI's exit code.
Two faults at once, for the announcement that must win on every rank:
`data+echo`: `data` on RANK; the other rank, once RANK has announced its stop and its own watcher
has broken its group, fails with a ValueError (as a collective on an aborted group can), which
must not replace RANK's message;
`data+bug`: `data` on RANK and a ValueError at step 3 on the other rank, together: whichever rank
announces first, every rank must print that one message.
"""

import os
import sys
import time


from pfb_train import cli, engine, train
from pfb_train.distributed import group_broken, stopped_elsewhere
from pfb_train.errors import UserError

fault, faulty_rank = sys.argv[1], int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1 :]


def inject_data_fault():
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


def inject_step_fault(error, wait_for_stop=False):
    real_step, calls = engine.train_step, []

    def train_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            while wait_for_stop and (stopped_elsewhere(wait_seconds=0.0) is None or not group_broken()):
                time.sleep(0.01)  # until the stop is announced and this rank's watcher has broken its group
            raise error
        return real_step(*a, **k)

    engine.train_step = train_step


mine = int(os.environ.get("RANK", 0)) == faulty_rank
if fault.startswith("data") and mine:
    inject_data_fault()
elif fault == "bug" and mine:
    inject_step_fault(ZeroDivisionError("injected"))
elif fault == "data+echo":
    inject_step_fault(ValueError("Default process group has not been initialized"), wait_for_stop=True)
elif fault == "data+bug":
    inject_step_fault(ValueError("injected at the same time"))
sys.exit(cli.main(args))
