"""Checkpoints: atomic writes, the previous one kept, the newest readable one found on resume.

A write goes to a temporary file that is fsynced and then renamed over the target, so a
crash (even SIGKILL) leaves either the old or the new file, never a torn one. The file it
replaces is kept as checkpoint-prev.pt, so one unreadable file never loses the run.
"""

from __future__ import annotations

import os
import pickletools
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pfb_train.distributed import all_gather_objects, get_rank, get_world_size
from pfb_train.errors import UserError

LAST, PREVIOUS, BEST = "checkpoint-last.pt", "checkpoint-prev.pt", "checkpoint-best.pt"


def save_atomic(obj, path: Path, keep_previous: Path | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the renames themselves durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, run_dir: Path, best: bool = False) -> Path:
    path = Path(run_dir) / LAST
    try:
        save_atomic(state, path, keep_previous=Path(run_dir) / PREVIOUS)
        if best:
            save_atomic(state, Path(run_dir) / BEST)
    except (OSError, RuntimeError) as e:  # a full disk (torch's writer raises RuntimeError), a read-only mount
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        free = shutil.disk_usage(run_dir).free / 2**20
        raise UserError(
            f"cannot write a checkpoint in {run_dir} ({reason}; {free:.1f} MiB free); the checkpoints "
            "already there are kept: make room, then run the same command with --resume auto"
        ) from None
    return path


def has_checkpoint_files(run_dir) -> bool:
    return any((Path(run_dir) / name).exists() for name in (LAST, PREVIOUS))


# What checkpoints of earlier versions hold besides tensors and plain containers: NumPy's RNG state, an
# array of uint32. These are what PyTorch's documentation of torch.load names for a weights-only load of
# NumPy arrays: the array, its dtype (and the dtype's class), and the function that rebuilds the array,
# under the name NumPy 2 pickles it by and the one NumPy 1 did.
_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
EARLIER_NUMPY = (
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
)
ALLOWED_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in EARLIER_NUMPY}


def load_checkpoint(path: Path):
    """The checkpoint at `path`, or None (with a warning) when it is missing or unreadable (torn, truncated).

    Loaded with `weights_only=True`: tensors and plain containers only, so a file that would run code
    when unpickled is never executed: raises UserError naming what it holds instead."""
    if not Path(path).is_file():
        return None
    try:
        with torch.serialization.safe_globals(list(EARLIER_NUMPY)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        foreign = _foreign_objects(path)
        if foreign:
            raise UserError(
                f"checkpoint {path} holds objects other than tensors and plain containers "
                f"({', '.join(foreign[:3])}), which loading would run as code; pfb-train never writes "
                "them: it was not loaded (use a checkpoint from a source you trust)"
            ) from None
        print(f"pfb-train: warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
        return None


def _foreign_objects(path: Path) -> list[str]:
    """The globals a checkpoint's pickle names beyond tensors, plain containers and EARLIER_NUMPY, read from
    its opcodes (nothing runs): of a torch.save archive, or of a plain pickle stream (pickle.dump, the
    format of torch.save before 1.6, which pfb-train never writes). [] for a torn archive."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":  # a zip archive, as torch.save writes
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # torn: unreadable, not foreign
                names = []
        else:
            f.seek(0)
            names = [n for n in _pickled_globals(f) if not n.startswith(("torch.", "collections.OrderedDict"))]
    return [name for name in names if name not in ALLOWED_NAMES]


def _pickled_globals(stream) -> list[str]:
    """'module.name' of each global named by the pickles in `stream`, one after another, up to the first
    thing that is not a pickle."""
    names = []
    try:
        while True:
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    assert isinstance(arg, str)  # 'module name'; a failure here ends the scan, as any other
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # the end of the stream, or a tensor's raw bytes
        return names


def latest_checkpoint(run_dir) -> tuple:
    """(path, state) of the newest readable checkpoint in `run_dir`, or (None, None)."""
    for name in (LAST, PREVIOUS):
        state = load_checkpoint(Path(run_dir) / name)
        if state is not None:
            return Path(run_dir) / name, state
    return None, None


def rng_state() -> dict:
    """This process's generator states as tensors and plain values (a weights-only load reads them)."""
    # legacy=True is the default: named, as numpy's stubs type the call without it as the dict form
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # the global generator is MT19937: its legacy form is the tuple
    kind, keys, position, has_gauss, gauss = legacy
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # keys: a tensor, or an array in checkpoints of earlier versions
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> list[dict]:
    """Every rank's generator states, in rank order (a collective: call on all ranks)."""
    return all_gather_objects(rng_state())


def restore_rng(states: list[dict]) -> bool:
    """Take this rank's saved states; False when the world size changed since they were saved."""
    if len(states) != get_world_size():
        return False
    set_rng_state(states[get_rank()])
    return True
