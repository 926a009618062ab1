import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, cwd=None, timeout=300):
    """Run `python -m pfb_train ARGS` in a subprocess; returns CompletedProcess with text output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pfb_train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
