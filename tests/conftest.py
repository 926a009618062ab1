import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# One torch thread per pytest-xdist worker (the suite runs with -n auto: one worker per core), two without.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Marks that follow from what a test uses: a test that starts the CLI as a process (the `cli` fixture) is
    `slow`; a `distributed` test (torchrun) is `slow` too, and all of them run on one xdist worker, one at a
    time, so two torchrun jobs never share the cores; a `gpu` test skips without CUDA."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cli" in getattr(item, "fixturenames", ()) or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.xdist_group("torchrun"))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def run_cli(*args, cwd=None, timeout=300):
    """Run `python -m pfb_train ARGS` in a subprocess; returns CompletedProcess with text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pfb_train", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


class BatchList:
    """The training loop's view of a DataLoader: a list of (x, y, index) batches, a batch size, a length."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, batches[0][0].shape[0]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.fixture
def cli():
    return run_cli


def smooth_image(rng, h, w):
    """Low-frequency content, like a photo: resampling methods and JPEG decoders then agree closely."""
    coarse = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def write_smooth_folder(root, per_class, size=lambda i: (40 + 3 * i, 52)):
    """root/{train,val}/{a,b}/<i>.jpg of smooth images; `size(i)` gives (height, width)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(smooth_image(rng, *size(i))).save(root / split / c / f"{i}.jpg", quality=95)
    return rng


@pytest.fixture
def upgrade_run_logs():
    """scripts/upgrade_run_logs.py as a module: the one-off rewrite of run directories of earlier versions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "upgrade_run_logs.py"
    spec = importlib.util.spec_from_file_location("upgrade_run_logs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
