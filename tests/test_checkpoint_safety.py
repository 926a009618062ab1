"""Checkpoints hold tensors and plain containers only, and are loaded so (`weights_only=True`): a file
whose pickle would run code is refused, never run."""

import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from pfb_train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_atomic, set_rng_state
from pfb_train.cli import main
from pfb_train.errors import UserError

CONFIG = """
name: run
model: {name: test_resnet}
blocking: {method: pfb, pfb: {centres: 4, start_epoch: 0}}
data: {dataset: synthetic, img_size: 32, batch_size: 16, train_samples: 48, val_samples: 16, workers: 0}
optim: {ema_decay: 0.9}
schedule: {epochs: 2, warmup_epochs: 0}
runtime: {device: cpu, progress: false, checkpoint_every: 2}
"""


def train(tmp_path, *args) -> int:
    (tmp_path / "run.yaml").write_text(CONFIG)
    return main(["--config", str(tmp_path / "run.yaml"), "--set", f"runtime.output={tmp_path / 'runs'}", *args])


class RunsCode:
    """Unpickling this runs `touch MARK`."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_not_run(tmp_path, capsys):
    run_dir, mark = tmp_path / "runs" / "run", tmp_path / "ran"
    run_dir.mkdir(parents=True)
    torch.save({"model": RunsCode(mark), "epoch": 0}, run_dir / "checkpoint-last.pt")
    code = train(tmp_path, "--resume", "auto")
    err = capsys.readouterr().err
    assert code == 2 and not mark.exists()
    assert err.strip() == (
        f"pfb-train: error: checkpoint {run_dir / 'checkpoint-last.pt'} holds objects other than "
        "tensors and plain containers (posix.system), which loading would run as code; pfb-train "
        "never writes them: it was not loaded (use a checkpoint from a source you trust)"
    )


@pytest.mark.parametrize("write", ["pickle", "torch.save before 1.6"])
def test_a_plain_pickle_that_would_run_code_is_refused_too(tmp_path, write):
    import pickle

    path, mark = tmp_path / "checkpoint-last.pt", tmp_path / "ran"
    if write == "pickle":
        path.write_bytes(pickle.dumps({"model": RunsCode(mark)}))
    else:
        torch.save({"model": RunsCode(mark)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match=r"holds objects other than tensors and plain containers \(posix.system\)"):
        load_checkpoint(path)
    assert not mark.exists()


def test_what_a_run_writes_loads_as_weights_only_and_goes_on(tmp_path):
    """Every part (inside an epoch too: tallies, every rank's streams, the EMA) survives the safe load,
    which needs no allowance at all."""
    assert train(tmp_path, "--set", "runtime.checkpoint_every=2", "--set", "schedule.epochs=1") == 0
    # 3 steps per epoch: the step-2 checkpoint is inside epoch 0, kept as -prev by the epoch end's
    inside = torch.load(tmp_path / "runs" / "run" / "checkpoint-prev.pt", weights_only=True)
    end = torch.load(tmp_path / "runs" / "run" / "checkpoint-last.pt", weights_only=True)
    assert inside["partial"] is not None and end["partial"] is None and end["ema"] is not None
    assert isinstance(end["rng"][0]["numpy"][1], torch.Tensor)
    assert train(tmp_path, "--resume", "auto") == 0  # and goes on from there


@pytest.mark.parametrize("numpy_name", ["numpy._core", "numpy.core"])
def test_checkpoints_of_earlier_versions_still_load(tmp_path, numpy_name):
    """They held NumPy's RNG state as an array: read with only NumPy's array types allowed, as PyTorch
    documents it (under the name NumPy 2 pickles its array builder by, and NumPy 1's), and the stream
    goes on where it was."""
    np.random.seed(3)
    kind, keys, *rest = rng_state()["numpy"]
    earlier = {"rng": [{**rng_state(), "numpy": np.random.get_state()}], "epoch": 1}
    torch.save(earlier, tmp_path / "now.pt")
    with zipfile.ZipFile(tmp_path / "now.pt") as now, zipfile.ZipFile(tmp_path / "old.pt", "w") as old:
        for item in now.infolist():  # the pickle as the NumPy of its day named the function
            data = now.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", f"{numpy_name}.multiarray".encode())
            old.writestr(item, data)
    expected = np.random.rand(3)
    np.random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"][0])
    assert np.array_equal(np.random.rand(3), expected)
    assert torch.equal(keys, torch.from_numpy(earlier["rng"][0]["numpy"][1].astype(np.int64)))


WRITER = """
import sys, torch
from pfb_train.checkpoint import save_atomic
save_atomic({"payload": torch.ones(80_000_000), "tag": "new"}, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "checkpoint-last.pt"
    save_atomic({"tag": "old"}, target)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint-last.pt.*")) and time.time() < deadline:
        time.sleep(0.01)  # the temporary file exists: the write is under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(target, weights_only=False)["tag"] in ("old", "new")  # never a torn file
    path, state = latest_checkpoint(tmp_path)
    assert path == target
