import os

import pytest
import torch
from helpers import run_cli

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


@pytest.fixture
def cli():
    return run_cli


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
