"""How a run stops and is continued: Ctrl-C (SIGINT) like a preemption, a second one aborting; SIGTERM
saving a checkpoint the same command resumes from; the stop line naming what continues this run; `--resume
auto` never reporting success for a run it did not continue; loader workers living through a stop signal
sent to the whole job and ending when the training process does."""

import os
import signal
import subprocess
import sys
import time

import pytest

import pfb_train.engine
from pfb_train.checkpoint import latest_checkpoint
from pfb_train.cli import main
from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.run_dir import read_metrics
from pfb_train.train import setup
from helpers import IMAGE_FOLDER_RUN, final_state, write_image_folder

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


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pfb_train",
        "--config",
        "demo",
        "--set",
        f"runtime.output={tmp_path}",
        "--set",
        "schedule.epochs=30",
        "--set",
        "runtime.progress=false",
        "--set",
        "model.name=test_resnet",
        "--resume",
        "auto",
    ]  # test_resnet: the demo's data and recipe at a fraction of resnet18's time
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    for line in proc.stdout:
        if line.startswith("epoch 0:"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err
    saved = final_state(tmp_path / "demo")
    assert 1 <= saved["epoch"] < 30
    args[args.index("schedule.epochs=30")] = "schedule.epochs=3"  # finish quickly
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path / "demo")][-1] == 2


def test_loader_workers_live_through_a_stop_signal_sent_to_the_whole_job(tmp_path):
    """A scheduler or torchrun signals every process of the job (a terminal's Ctrl-C, the foreground group):
    the loader's workers go on (the training process stops at its next check, after a checkpoint),
    instead of dying and failing the run."""
    import multiprocessing

    write_image_folder(tmp_path / "data")  # 16 training images: 4 batches of 4
    state = setup(
        load_config(
            None, [*IMAGE_FOLDER_RUN, f"data.root={tmp_path}/data", "data.workers=2", f"runtime.output={tmp_path}"]
        ),
        DistInfo(),
    )
    batches = iter(state.train_loader)
    next(batches)  # the workers have started (with the first batch, maybe not each one's setup)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker, sig in zip(workers, ("TERM", "INT")):  # from another process: `kill`, `scancel`, torchrun's agent
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert len(list(batches)) == 3 and all(w.is_alive() for w in workers)


def _mark_worker(folder: str, worker_id: int) -> None:
    open(f"{folder}/init{worker_id}", "w").close()


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_loader_workers_run_the_callers_init_and_end_when_the_training_process_asks(context, tmp_path):
    """A caller's `worker_init_fn` still runs; the training process's own SIGTERM ends a worker at once
    (forkserver: PyTorch's own handling, which ends a worker on any sender but its parent)."""
    import functools

    from pfb_train.preemption import StopSafeDataLoader

    loader = StopSafeDataLoader(
        list(range(8)),
        batch_size=2,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context=context,
        worker_init_fn=functools.partial(_mark_worker, str(tmp_path)),
    )
    batches = iter(loader)
    next(batches)
    assert (tmp_path / "init0").exists()
    [worker] = batches._workers  # (PyTorch's iterator's list of its worker processes)
    worker.terminate()
    worker.join(timeout=20)
    assert worker.exitcode == (0 if context == "fork" else -signal.SIGTERM)


EXIT_WITH_LIVE_WORKERS = """
import sys
from pfb_train.config import load_config
from pfb_train.distributed import DistInfo
from pfb_train.train import setup
state = setup(load_config(None, sys.argv[1:]), DistInfo())
next(iter(state.train_loader))
state.cycle = state  # kept alive to the interpreter's exit, as by a failed test's frames or a notebook
print("exiting", flush=True)
"""


@pytest.mark.slow
def test_a_process_exits_while_its_loader_workers_are_alive(tmp_path):
    """The workers drop a stop signal from others, not their own training process's: the interpreter's
    exit ends them (multiprocessing terminates them) instead of waiting for them forever."""
    write_image_folder(tmp_path / "data")
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            EXIT_WITH_LIVE_WORKERS,
            *IMAGE_FOLDER_RUN,
            f"data.root={tmp_path}/data",
            "data.workers=2",
            f"runtime.output={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - started < 60
