"""How a process learns its place in a job: torchrun's variables, or SLURM's when `srun` starts one process
per task without torchrun (distributed.slurm_environment)."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfb_train.distributed import first_host, slurm_environment

HERE = Path(__file__).resolve().parent
SLURM_TASK = {
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "4242",
}


def test_srun_tasks_become_torchrun_variables():
    env = {**SLURM_TASK, "SLURM_JOB_NODELIST": "gpu[07-08,12]"}
    assert slurm_environment(env) == {
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(12000 + 4242),
    }
    assert slurm_environment({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})["MASTER_ADDR"] == "head"
    assert slurm_environment({**env, "RANK": "0"}) is None  # torchrun's own variables win
    assert slurm_environment({**env, "SLURM_STEP_NUM_TASKS": "1"}) is None  # a step of one task: srun torchrun
    batch_shell = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert slurm_environment(batch_shell) is None  # an sbatch script's shell, even of a job of 4 tasks
    hosts = ("node3", "a1,b2", "x-y[001-010]", "n[5]", "rack[1,3-4]n,c2")
    assert [first_host(n) for n in hosts] == ["node3", "a1", "x-y001", "n5", "rack1n"]


def free_job_id() -> int:
    """A SLURM job id whose port (12000 + id mod 20000) is free here."""
    for _ in range(100):
        job = random.randrange(20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 12000 + job))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.mark.distributed
def test_two_srun_tasks_train_together_without_torchrun(tmp_path):
    """Two plain processes with only SLURM's task variables join one gloo group and train as torchrun's do."""
    (tmp_path / "ddp.yaml").write_text(
        "name: ddp\nmodel: {name: test_resnet}\nblocking: {method: pfb, pfb: {ratio: 0.25, centres: 8}}\n"
        "data: {dataset: synthetic, img_size: 32, batch_size: 16, train_samples: 64, val_samples: 16, workers: 0}\n"
        "schedule: {epochs: 1, warmup_epochs: 0}\nruntime: {device: cpu, progress: false, threads: 1}\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    job = str(free_job_id())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "ddp.yaml"), str(tmp_path), "fit"],
            env={
                **base,
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "2",
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_LOCALID": str(r),
                "SLURM_JOB_ID": job,
                "SLURM_JOB_NODELIST": "localhost",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for name, value in ranks[0]["model"].items():  # DDP kept the two tasks' weights identical
        assert torch.equal(value, ranks[1]["model"][name]), name
    assert "2 process(es)" in outputs[0][0] and ranks[0]["summary"]["epochs"] == 1
