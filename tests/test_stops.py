"""How a run stops and is continued, in process: Ctrl-C (SIGINT) like a preemption, a second one aborting;
the stop line naming what continues this run; `--resume auto` never reporting success for a run it did
not continue."""

import os
import signal

import pytest

import pfb_train.engine
from pfb_train.checkpoint import latest_checkpoint
from pfb_train.cli import main

CONFIG = """
name: trap
model: {name: test_resnet}
data: {dataset: synthetic, img_size: 32, batch_size: 16, train_samples: 64, val_samples: 16, workers: 0}
schedule: {epochs: 2, warmup_epochs: 0}
runtime: {device: cpu, progress: false}
"""


@pytest.fixture
def train(tmp_path, capsys):
    """train(*args, signals=(step, signal)...) -> (exit code, stderr): the CLI in this process, with `signal`
    sent to it during its `step`-th optimizer step (1-based)."""
    config = tmp_path / "trap.yaml"
    config.write_text(CONFIG)
    original = pfb_train.engine.train_step

    def run(*args, signals=()):
        calls = []

        def step(*a, **k):
            calls.append(1)
            for when, signum in signals:
                if when == len(calls):
                    os.kill(os.getpid(), signum)  # handled at the next bytecode: inside this step
            return original(*a, **k)

        pfb_train.engine.train_step = step
        try:
            capsys.readouterr()
            code = main(["--config", str(config), "--set", f"runtime.output={tmp_path / 'runs'}", *args])
        finally:
            pfb_train.engine.train_step = original
        return code, capsys.readouterr().err

    return run


def test_ctrl_c_stops_with_a_checkpoint_and_the_run_resumes(train, tmp_path):
    code, err = train(signals=[(2, signal.SIGINT)])
    assert code == 128 + signal.SIGINT
    assert "pfb-train: interrupt: stopping with a checkpoint at the end of this step" in err
    assert (
        f"stopped by SIGINT at epoch 0, step 2; checkpoint saved in {tmp_path / 'runs' / 'trap'}; run the same "
        "command with --resume auto to continue"
    ) in err
    assert latest_checkpoint(tmp_path / "runs" / "trap")[1]["step"] == 2
    assert train("--resume", "auto") == (0, "")


def test_ctrl_c_is_left_alone_where_it_is_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored: it is not meant for it."""
    from pfb_train.preemption import PreemptionSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with PreemptionSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_aborts_at_once(train, tmp_path):
    code, err = train(signals=[(3, signal.SIGINT), (3, signal.SIGINT)])
    assert code == 130 and err.strip().splitlines()[-1] == "pfb-train: interrupted"
    assert latest_checkpoint(tmp_path / "runs" / "trap") == (None, None)  # no checkpoint: aborted


def test_the_stop_line_names_what_continues_a_run_beside_a_finished_one(train, tmp_path):
    """The same command twice without --resume: the second run lives in runs/trap-2, where --resume auto
    does not look. Its stop line names it, and --resume auto refuses (exit 2) rather than report the
    finished runs/trap as success."""
    runs = tmp_path / "runs"
    assert train()[0] == 0
    code, err = train(signals=[(2, signal.SIGTERM)])
    assert code == 128 + signal.SIGTERM
    assert f"run the same command with --resume {runs / 'trap-2'} to continue" in err
    code, err = train("--resume", "auto")
    assert code == 2 and err.strip() == (
        f"pfb-train: error: --resume auto found run trap in {runs / 'trap'} finished, but {runs / 'trap-2'} holds "
        f"an unfinished run of the same name (started without --resume): nothing trained; continue it with "
        f"--resume {runs / 'trap-2'}"
    )
    code, err = train("--set", "name=trap-10", signals=[(2, signal.SIGTERM)])  # another run, named like one
    assert code == 128 + signal.SIGTERM and "--resume auto to continue" in err
    assert train("--resume", str(runs / "trap-2")) == (0, "")
    assert (runs / "trap-2" / "summary.json").is_file()
    assert train("--resume", "auto")[0] == 0  # nothing of its name unfinished: the finished run is reported as such
