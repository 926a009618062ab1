"""torch.distributed set-up from torchrun's environment (or SLURM's, for srun without torchrun), and the few
collectives the harness uses.

Every helper is a no-op in a single process, so callers never branch on world size.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun, or made from SLURM's task variables by
    `slurm_environment`); NCCL on GPU, gloo on CPU."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    os.environ.update(slurm_environment(os.environ) or {})  # env:// and the stop store read them
    if "RANK" not in os.environ:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        index = local % torch.cuda.device_count()  # srun --gpus-per-task shows each task its own GPU only
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def slurm_environment(env) -> Optional[dict[str, str]]:
    """torchrun's variables made from SLURM's, for one process per task of an `srun` step without torchrun
    (as torchvision's references and Lightning read them): RANK from SLURM_PROCID, WORLD_SIZE from
    SLURM_STEP_NUM_TASKS, LOCAL_RANK from SLURM_LOCALID, LOCAL_WORLD_SIZE from SLURM_NTASKS_PER_NODE,
    MASTER_ADDR the node list's first host and MASTER_PORT 12000 + job id mod 20000 (both unless set
    already). None where torchrun's are set, outside an srun step (an `sbatch` script's own shell, even of a
    job of many tasks) or in a step of one task (`srun` around torchrun)."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # e.g. '8', or '8(x2)' in some versions
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        **({"LOCAL_WORLD_SIZE": per_node} if per_node.isdigit() else {}),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(12000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed form: 'gpu[07-09,12],cpu1' -> 'gpu07',
    'rack[1-2]n' -> 'rack1n'."""
    head = nodelist.split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)  # the brackets may hold commas themselves
    ranges, after = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + after.split(",", 1)[0]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    """Any picklable object from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------- stopping every rank together
#
# An error on one rank (an unreadable batch, a failed checkpoint write, a bug) must end every rank
# promptly, with the same message. What torchrun and torch.distributed.elastic give: when a worker
# exits with an error, the agent terminates the others (SIGTERM, which here would read as a
# preemption) and `@record` keeps the failing rank's traceback; the other ranks, meanwhile, sit in a
# collective until it times out, and print nothing of why. What is left to do here, on public APIs
# only: the failing rank leaves its one-line message in torchrun's key-value store (a TCPStore
# client at MASTER_ADDR:MASTER_PORT) and aborts its process group (ProcessGroup.abort); every rank
# watches the key from a thread and aborts its side too, so a pending collective fails at once;
# `stopped_elsewhere` then reads the message and every rank ends with the same line and exit code.

_watcher: Optional[threading.Thread] = None
_stopping = threading.Event()
_broken = threading.Event()  # this rank has aborted its process group
_stop_store: Optional[dist.TCPStore] = None  # a client of torchrun's store, held by this module


def _stop_key() -> str:
    """One key per job and restart: torchrun's store outlives a restart (--max-restarts)."""
    return f"pfb_train/stop/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store() -> dist.TCPStore:
    """A client of the store torchrun serves at MASTER_ADDR:MASTER_PORT (the one env:// joins)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
    )


def sharing_stops() -> bool:
    """Whether this rank's stops are shared with other ranks (a multi-process run, watched). Not
    `is_distributed()`: once a rank's group is broken, that says False."""
    return _stop_store is not None


def group_broken() -> bool:
    """Whether this rank has aborted its process group (its own stop, or another rank's seen by the
    watcher): collectives on it now fail."""
    return _broken.is_set()


def _break_group() -> None:
    _broken.set()
    try:
        world = dist.group.WORLD
        if world is not None:  # None once destroyed
            world.abort()  # pending NCCL collectives fail at once
    except Exception:  # already gone, or a backend whose abort fails: its peers see closed connections
        pass


def _watch(store) -> None:
    while not _stopping.wait(0.2):
        try:
            if store.check([_stop_key()]):
                _break_group()
                return
        except Exception:  # the store went away: the job is ending anyway
            return


def watch_for_stops() -> None:
    """Start the watcher thread (multi-process runs joined through env://, as torchrun does; once)."""
    global _watcher, _stop_store
    if is_distributed() and get_world_size() > 1 and _watcher is None and "MASTER_ADDR" in os.environ:
        _stopping.clear()
        _broken.clear()
        _stop_store = _store()
        _watcher = threading.Thread(target=_watch, args=(_stop_store,), daemon=True, name="pfb-stop-watch")
        _watcher.start()


def announce_stop(kind: str, message: str) -> Optional[tuple[str, int, str]]:
    """This rank cannot go on: tell every rank why (`kind`: the exception's class name), then break the
    group. Returns the announcement that stands: the first rank's to announce (this one's, unless
    another rank's error came first and this one is its echo)."""
    store = _stop_store
    if store is None:  # not sharing_stops()
        return None
    standing = store.compare_set(_stop_key(), "", f"{kind}\t{get_rank()}\t{message}")  # atomic: first one wins
    _break_group()
    return _parse_stop(standing)


def stopped_elsewhere(wait_seconds: float = 10.0) -> Optional[tuple[str, int, str]]:
    """(kind, rank, message) if a rank announced a stop; waits a little, since a collective can fail
    before the failing rank has written its message."""
    store = _stop_store
    if store is None:  # not sharing_stops()
        return None
    try:
        if wait_seconds > 0:
            store.wait([_stop_key()], timedelta(seconds=wait_seconds))
        elif not store.check([_stop_key()]):  # wait() with no time raises even when the key is there
            return None
    except Exception:
        return None
    return _parse_stop(store.get(_stop_key()))


def _parse_stop(value: bytes) -> tuple[str, int, str]:
    kind, rank, message = value.decode().split("\t", 2)
    return kind, int(rank), message


def cleanup(clean: bool = True) -> None:
    """`clean`: every rank finished; a stop skips the barrier (a broken group cannot hold one)."""
    global _watcher, _stop_store
    _stopping.set()
    _watcher = _stop_store = None
    if is_distributed():
        if clean:
            dist.barrier()  # no rank tears the group down while another is still in a collective
        try:
            dist.destroy_process_group()
        except Exception:
            pass
