"""The run directory: what a run writes there (metrics.jsonl, TensorBoard, summary.json, unreadable.txt)
and reads back (its own metrics on resume, a baseline run's for comparison)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from pfb_train.errors import UserError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

UNREADABLE_FILE = "unreadable.txt"  # each epoch's unreadable training images: 'epoch<TAB>name' lines


def one_line(name: str) -> str:
    """`name` with tabs and line breaks written as escapes: a file name may hold them, a line may not."""
    return name.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def make_run_dir(output: str, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when that already holds a run: never overwrite one."""
    base = Path(output).expanduser() / name
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLogger:
    """Writes metrics.jsonl (one JSON line per epoch), TensorBoard scalars and summary.json; rank 0 only."""

    def __init__(self, run_dir: Optional[Path], enabled: bool = True):
        """`run_dir`: None where not `enabled` (ranks other than 0 have none)."""
        self.run_dir, self.enabled = run_dir, enabled
        self.writer: Optional[SummaryWriter] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # on rank 0 only: it loads the tensorboard package (~1 s)

            self.writer = SummaryWriter(str(run_dir))

    def log_epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        run_dir, writer = self.run_dir, self.writer
        assert run_dir is not None and writer is not None  # set when enabled
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(f"epoch/{key}", value, record["epoch"])
            elif isinstance(value, list) and any(v is not None for v in value):  # per-class values
                writer.add_histogram(f"epoch/{key}", torch.tensor([v for v in value if v is not None]), record["epoch"])
        writer.flush()

    def log_unreadable(self, epoch: int, names: list[str]) -> None:
        """Append an epoch's unreadable training images to unreadable.txt."""
        if self.enabled:
            assert self.run_dir is not None  # given when enabled
            with open(self.run_dir / UNREADABLE_FILE, "a") as f:
                f.writelines(f"{epoch}\t{one_line(name)}\n" for name in names)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            assert self.run_dir is not None  # given when enabled
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """The run directory's per-epoch files as of a checkpoint's `history`: epochs logged after it (a resume
    redoes them) dropped from metrics.jsonl and unreadable.txt."""
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    unreadable = Path(run_dir) / UNREADABLE_FILE
    if unreadable.is_file():
        lines = unreadable.read_text().splitlines(keepends=True)
        unreadable.write_text("".join(line for line in lines if int(line.split("\t", 1)[0]) < len(history)))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class BaselineComparison:
    """Compares each epoch with the same epoch of a finished full-data run (`runtime.baseline`)."""

    def __init__(self, run_dir):
        path = Path(run_dir).expanduser()
        if not (path / "metrics.jsonl").is_file():
            raise UserError(
                f"config key 'runtime.baseline': no metrics.jsonl in {path} (expected a finished run directory)"
            )
        records = read_metrics(path)
        self.top1 = {r["epoch"]: r["top1"] for r in records if "top1" in r}
        self.cumulative_seconds, total = {}, 0.0
        for r in records:
            total += r["epoch_seconds"]
            self.cumulative_seconds[r["epoch"]] = total

    def compare(self, record: dict, cumulative_seconds: float) -> dict:
        """Top-1 difference in points and training time saved in % at this epoch."""
        epoch, out = record["epoch"], {}
        if "top1" in record and epoch in self.top1:
            out["vs_baseline_top1"] = record["top1"] - self.top1[epoch]
        if self.cumulative_seconds.get(epoch):
            out["vs_baseline_time_saved_pct"] = 100.0 * (1.0 - cumulative_seconds / self.cumulative_seconds[epoch])
        return out
