"""`pfb-train report`: the paper-style comparison table (markdown + CSV) and plots from run directories.

Runs that differ only in seed are one row: mean ± std over them. Times come from the runs'
own metrics: training time is the sum of epoch times, selection overhead the time spent in
the selection hooks (density scoring, centre updates, InfoBatch's score gathering and epoch
sampling), device-hours the training time times the number of processes.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from pfb_train.errors import UserError
from pfb_train.metrics import read_metrics


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    metrics: list[dict]

    @property
    def key(self) -> tuple:
        """Runs with the same key are seeds of one experiment."""
        c = self.config
        return (c["model"]["name"], c["data"]["dataset"], self.summary["method"], self.summary["ratio"])

    @property
    def label(self) -> str:
        method, ratio = self.summary["method"], self.summary["ratio"]
        return "full data" if method == "none" else f"{method} {ratio:g}"

    @property
    def device_hours(self) -> float:
        return self.summary["train_seconds"] * self.summary.get("world_size", 1) / 3600


def load_run(path) -> Run:
    path = Path(path)
    if not (path / "summary.json").is_file():
        raise UserError(f"not a finished run directory: {path} (no summary.json)")
    return Run(path, json.loads((path / "summary.json").read_text()),
               yaml.safe_load((path / "config.yaml").read_text()), read_metrics(path))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_runs(runs: list[Run]) -> list[list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    return list(groups.values())


def table_rows(runs: list[Run], baseline: list[Run]) -> list[dict]:
    base_top1 = statistics.fmean(r.summary["top1"] for r in baseline)
    base_hours = statistics.fmean(r.device_hours for r in baseline)
    rows = []
    for group in group_runs(runs):
        s = [r.summary for r in group]
        top1, top1_std = _mean_std([x["top1"] for x in s])
        seconds, seconds_std = _mean_std([x["train_seconds"] for x in s])
        overhead = statistics.fmean(x.get("selection_seconds", 0.0) for x in s)
        hours = statistics.fmean(r.device_hours for r in group)
        rows.append({
            "method": s[0]["method"],
            "ratio": s[0]["ratio"],
            "seeds": len(group),
            "blocked_fraction": statistics.fmean(x["blocked_fraction"] for x in s),
            "top1": top1,
            "top1_std": top1_std,
            "top1_delta": top1 - base_top1,
            "train_seconds": seconds,
            "train_seconds_std": seconds_std,
            "train_hours": (seconds - overhead) / 3600,
            "selection_hours": overhead / 3600,
            "device_hours": hours,
            "time_reduction_pct": 100 * (1 - hours / base_hours) if base_hours > 0 else 0.0,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | ratio | seeds | blocked (realised) | top-1 % | Δ top-1 | train s | training h | "
            "selection h | device-h | time saved |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        std = f" ± {r['top1_std']:.2f}" if r["seeds"] > 1 else ""
        sec_std = f" ± {r['train_seconds_std']:.1f}" if r["seeds"] > 1 else ""
        ratio = "-" if r["method"] == "none" else f"{r['ratio']:g}"
        lines.append(
            f"| {r['method']} | {ratio} | {r['seeds']} | {r['blocked_fraction']:.3f} | {r['top1']:.2f}{std} | "
            f"{r['top1_delta']:+.2f} | {r['train_seconds']:.1f}{sec_std} | {r['train_hours']:.4f} | "
            f"{r['selection_hours']:.4f} | {r['device_hours']:.4f} | {r['time_reduction_pct']:.1f} % |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _per_epoch_mean(group: list[Run], field: str, cumulative: bool = False) -> tuple[list[int], list[float]]:
    epochs = min(len(r.metrics) for r in group)
    values = []
    for e in range(epochs):
        per_run = []
        for r in group:
            series = [m.get(field) for m in r.metrics[: e + 1]]
            per_run.append(sum(series) if cumulative else series[-1])
        present = [v for v in per_run if v is not None]
        values.append(statistics.fmean(present) if present else float("nan"))
    return list(range(epochs)), values


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """top-1 per epoch, cumulative training wall-clock per epoch, kept fraction per epoch (means over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = [("top1.png", "top1", False, "top-1 (%)"),
             ("wallclock.png", "epoch_seconds", True, "cumulative training time (s)"),
             ("kept_fraction.png", "kept_fraction", False, "kept fraction of sample-passes")]
    paths = []
    for name, field, cumulative, ylabel in plots:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for group in group_runs(runs):
            x, y = _per_epoch_mean(group, field, cumulative)
            ax.plot(x, y, marker="o", markersize=3, label=group[0].label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


def report(run_dirs: list[str], baseline_dirs: list[str], out_dir: str) -> dict:
    baseline = [load_run(p) for p in baseline_dirs]
    baseline_paths = {b.path.resolve() for b in baseline}
    runs = baseline + [load_run(p) for p in run_dirs if Path(p).resolve() not in baseline_paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs, baseline)
    md = markdown_table(rows)
    (out / "report.md").write_text(md)
    write_csv(rows, out / "report.csv")
    plots = write_plots(runs, out)
    return {"rows": rows, "markdown": md, "plots": [str(p) for p in plots], "out": str(out)}
