"""`pfb-train report`: the paper-style comparison table (markdown + CSV) and plots from run directories.

Runs whose resolved configs are equal except for the seed (and where and how they were logged)
are one row: mean ± std over them. Each row is labelled by its method and ratio plus whatever
else tells it apart from the other rows (estimator, noise, image size, ...).

Times come from the runs' own metrics. `train s` is the mean ± std of the runs' total training
time. Time saved compares *robust* times: for each epoch the median over the row's seeds, summed
over epochs, so one stalled epoch of one seed does not move it (with one seed it is the total).
Selection overhead is the time spent in the selection hooks; device-hours are the robust
training time times the number of processes.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from pfb_train.config import experiment_settings, flatten
from pfb_train.errors import UserError
from pfb_train.run_dir import read_metrics

# Config keys that do not change what is trained: runs that differ only here are seeds of one row.
NOT_THE_EXPERIMENT = {
    "name",
    "runtime.seed",
    "runtime.output",
    "runtime.resume",
    "runtime.baseline",
    "runtime.progress",
    "runtime.log_every",
    "runtime.threads",
    "runtime.checkpoint_every",
    "runtime.eval_every",
}


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict
    metrics: list[dict]

    @property
    def key(self) -> tuple:
        """Runs with the same key are seeds of one experiment."""
        return tuple(sorted((k, repr(v)) for k, v in self.settings.items()))

    @property
    def settings(self) -> dict:
        return {k: v for k, v in flatten(experiment_settings(self.config)).items() if k not in NOT_THE_EXPERIMENT}

    @property
    def full_data(self) -> bool:
        """Summaries name the method's ratio option; None: it drops nothing."""
        return self.summary["ratio_option"] is None

    @property
    def ratio_key(self) -> str:
        """The config key of the method's own ratio option (the label shows it already)."""
        return f"blocking.{self.method}.{self.summary['ratio_option']}"

    @property
    def method(self) -> str:
        return self.summary["method"]

    @property
    def seed(self):
        return self.config.get("runtime", {}).get("seed")


def load_run(path) -> Run:
    path = Path(path)
    if not (path / "summary.json").is_file():
        raise UserError(f"not a finished run directory: {path} (no summary.json)")
    return Run(
        path,
        json.loads((path / "summary.json").read_text()),
        yaml.safe_load((path / "config.yaml").read_text()),
        read_metrics(path),
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_runs(runs: list[Run]) -> list[list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    return list(groups.values())


def group_labels(groups: list[list[Run]]) -> list[str]:
    """'method ratio' plus the settings that tell a group apart: blocking options that differ between
    groups of the same method, and any other option that differs between groups at all."""
    settings = [g[0].settings for g in groups]

    def varying(members: list[dict]) -> list[str]:
        keys = sorted({k for s in members for k in s})
        return [k for k in keys if len({repr(s.get(k)) for s in members}) > 1]

    everywhere = [k for k in varying(settings) if not k.startswith("blocking.")]
    labels = []
    for group, own in zip(groups, settings):
        same_method = [s for g, s in zip(groups, settings) if g[0].method == group[0].method]
        within = [k for k in varying(same_method) if k.startswith("blocking.") and k != group[0].ratio_key]
        extra = ", ".join(f"{k.rsplit('.', 1)[-1]}={own.get(k)}" for k in within + everywhere)
        method, ratio = group[0].method, group[0].summary["ratio"]
        base = "full data" if group[0].full_data else f"{method} {ratio:g}"
        labels.append(f"{base} ({extra})" if extra else base)
    return labels


def robust_seconds(group: list[Run]) -> float:
    """Sum over epochs of the median epoch time over the group's seeds."""
    epochs = min(len(r.metrics) for r in group)
    return sum(statistics.median(r.metrics[e]["epoch_seconds"] for r in group) for e in range(epochs))


def head_tail_top1(run: Run):
    """Mean top-1 of the classes with the most training samples (the upper half) and of the rest,
    at the last evaluation; None when classes are about balanced (largest < 1.5 x smallest) or not
    reported."""
    counts = run.summary.get("train_class_counts")
    per_class = next((r["val_class_top1"] for r in reversed(run.metrics) if "val_class_top1" in r), None)
    if not counts or per_class is None or max(counts) < 1.5 * min(counts):
        return None
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    half = len(order) // 2

    def mean(classes):
        values = [per_class[c] for c in classes if per_class[c] is not None]
        return statistics.fmean(values) if values else float("nan")

    return mean(order[:half]), mean(order[half:])


def compute_curve(run: Run) -> list[tuple[float, float]]:
    """(compute, top-1) at each evaluation: cumulative full-data epochs of compute (the epoch records'
    `compute`) against validation top-1 (%). Empty for runs logged before records counted compute."""
    return [(m["compute"], m["top1"]) for m in run.metrics if "top1" in m and "compute" in m]


# A budgeted run ends at the step where its budget is spent, within one step of it: a compute this close
# past a curve's end is read as its last evaluation.
END_TOLERANCE = 0.01


def top1_at_compute(curve: list[tuple[float, float]], compute: float):
    """Top-1 at `compute` full-data epochs on a (compute, top-1) curve, linear between evaluations; None
    before the first evaluation or past the end (beyond END_TOLERANCE of it)."""
    if not curve or compute < curve[0][0] or compute > curve[-1][0] * (1 + END_TOLERANCE):
        return None
    for (c0, t0), (c1, t1) in zip(curve, curve[1:]):
        if c0 <= compute <= c1:
            return t0 + (t1 - t0) * (compute - c0) / (c1 - c0) if c1 > c0 else t1
    return curve[-1][1]


def compute_to_reach(curve: list[tuple[float, float]], target: float):
    """Compute (full-data epochs) at which the validation curve first reaches `target` top-1 (%), linear
    between the evaluations that straddle it (time-to-accuracy); None when it never does."""
    for i, (c, t) in enumerate(curve):
        if t >= target:
            if i == 0:
                return c
            c0, t0 = curve[i - 1]
            return c0 + (c - c0) * (target - t0) / (t - t0)
    return None


def _over_seeds(values: list) -> tuple:
    """(mean, std, how many of `values` are not None) over the seeds that have a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    mean, std = _mean_std(present)
    return mean, std, len(present)


def table_rows(runs: list[Run], baseline: list[Run], target=None, compute=None) -> list[dict]:
    """One row per setting (seeds grouped). `target`: the top-1 (%) whose compute to reach is reported
    (None: the baseline's mean final top-1); `compute`: where top-1 at equal compute is read (None: the
    baseline's mean compute spent)."""
    base_top1 = statistics.fmean(r.summary["top1"] for r in baseline)
    target = base_top1 if target is None else target
    if compute is None:
        spent = [s for s in (r.summary.get("compute_spent") for r in baseline) if s is not None]
        compute = statistics.fmean(spent) if len(spent) == len(baseline) else None  # every run counted it
    base_hours = robust_seconds(baseline) * baseline[0].summary.get("world_size", 1) / 3600
    groups = group_runs(runs)
    rows = []
    for group, label in zip(groups, group_labels(groups)):
        s = [r.summary for r in group]
        top1, top1_std = _mean_std([x["top1"] for x in s])
        seconds, seconds_std = _mean_std([x["train_seconds"] for x in s])
        robust = robust_seconds(group)
        overhead = statistics.fmean(x.get("selection_seconds", 0.0) for x in s)
        hours = robust * s[0].get("world_size", 1) / 3600
        row = {
            "label": label,
            "method": s[0]["method"],
            "ratio": s[0]["ratio"],
            "seeds": len(group),
            "blocked_fraction": statistics.fmean(x["blocked_fraction"] for x in s),
            "top1": top1,
            "top1_std": top1_std,
            "top1_delta": top1 - base_top1,
            "train_seconds": seconds,
            "train_seconds_std": seconds_std,
            "train_seconds_robust": robust,
            "train_hours": (robust - overhead) / 3600,
            "selection_hours": overhead / 3600,
            "device_hours": hours,
            "time_reduction_pct": 100 * (1 - hours / base_hours) if base_hours > 0 else 0.0,
        }
        curves = [c for c in (compute_curve(r) for r in group) if c]  # runs logged before compute was: none
        row["compute_spent"], row["compute_spent_std"], row["seeds_counted"] = _over_seeds(
            [x.get("compute_spent") for x in s]
        )
        row["equal_compute"], row["target_top1"] = compute, target
        row["top1_at_compute"], row["top1_at_compute_std"], row["seeds_at_compute"] = _over_seeds(
            [top1_at_compute(c, compute) if compute is not None else None for c in curves]
        )
        row["compute_to_target"], row["compute_to_target_std"], row["seeds_reaching_target"] = _over_seeds(
            [compute_to_reach(c, target) for c in curves]
        )
        row["seeds_with_curve"] = len(curves)
        signals = [m["selection_signal"] for r in group for m in r.metrics if m.get("selection_signal") is not None]
        row["selection_signal"] = statistics.fmean(signals) if signals else None
        split = [head_tail_top1(r) for r in group]
        if all(x is not None for x in split):
            (row["top1_head"], row["top1_head_std"]), (row["top1_tail"], row["top1_tail_std"]) = (
                _mean_std([x[0] for x in split]),
                _mean_std([x[1] for x in split]),
            )
        rows.append(row)
    return rows


def _pm(mean: float, std: float, seeds: int, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def _of_seeds(mean, std, present: int, seeds: int, missing: str) -> str:
    """A per-seed measure as 'mean ± std', 'mean (k/n seeds)' when only k have it, or `missing`."""
    if present == 0:
        return missing
    if present < seeds:
        return f"{mean:.2f} ({present}/{seeds} seeds)"
    return _pm(mean, std, seeds)


def markdown_table(rows: list[dict]) -> str:
    split = any("top1_tail" in r for r in rows)
    counted = any(r.get("compute_spent") is not None for r in rows)
    head = "| run | seeds | blocked (realised) | signal | top-1 % | Δ top-1 |"
    if counted:  # time-to-accuracy: compute in full-data epochs
        equal, target = rows[0]["equal_compute"], rows[0]["target_top1"]
        at = f"top-1 @ {equal:.2f} ep" if equal is not None else "top-1 @ equal compute"
        head += f" compute (ep) | {at} | compute to {target:.2f} % |"
    if split:
        head += " head top-1 | tail top-1 |"
    head += " train s | training h | selection h | device-h | time saved |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        signal = "-" if r["selection_signal"] is None else f"{r['selection_signal']:.2f}"
        cells = [
            r["label"],
            str(r["seeds"]),
            f"{r['blocked_fraction']:.3f}",
            signal,
            _pm(r["top1"], r["top1_std"], r["seeds"]),
            f"{r['top1_delta']:+.2f}",
        ]
        if counted:
            cells += [
                _of_seeds(r["compute_spent"], r["compute_spent_std"], r["seeds_counted"], r["seeds"], "-"),
                _of_seeds(r["top1_at_compute"], r["top1_at_compute_std"], r["seeds_at_compute"], r["seeds"], "-"),
                _of_seeds(
                    r["compute_to_target"],
                    r["compute_to_target_std"],
                    r["seeds_reaching_target"],
                    r["seeds"],
                    "not reached" if r["seeds_with_curve"] else "-",
                ),
            ]
        if split:
            cells += [
                _pm(r["top1_head"], r["top1_head_std"], r["seeds"]) if "top1_head" in r else "-",
                _pm(r["top1_tail"], r["top1_tail_std"], r["seeds"]) if "top1_tail" in r else "-",
            ]
        cells += [
            _pm(r["train_seconds"], r["train_seconds_std"], r["seeds"], 1),
            f"{r['train_hours']:.4f}",
            f"{r['selection_hours']:.4f}",
            f"{r['device_hours']:.4f}",
            f"{r['time_reduction_pct']:.1f} %",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _per_epoch_mean(group: list[Run], field: str, cumulative: bool = False) -> tuple[list[int], list[float]]:
    epochs = min(len(r.metrics) for r in group)
    values = []
    for e in range(epochs):
        per_run = []
        for r in group:
            if cumulative:  # a field every epoch logs (epoch_seconds)
                per_run.append(sum(m[field] for m in r.metrics[: e + 1]))
            else:
                per_run.append(r.metrics[e].get(field))
        present = [v for v in per_run if v is not None]
        values.append(statistics.fmean(present) if present else float("nan"))
    return list(range(epochs)), values


def class_kept_table(group: list[Run]) -> list[list[float]]:
    """(classes, epochs): kept fraction of each class's rows per epoch, mean over seeds (nan: no rows)."""
    epochs = min(len(r.metrics) for r in group)
    columns = []
    for e in range(epochs):
        per_run = [r.metrics[e].get("class_kept_fraction") or [] for r in group]
        classes = max(len(p) for p in per_run)
        column = []
        for c in range(classes):
            present = [p[c] for p in per_run if c < len(p) and p[c] is not None]
            column.append(statistics.fmean(present) if present else float("nan"))
        columns.append(column)
    classes = max((len(c) for c in columns), default=0)
    return [[col[c] if c < len(col) else float("nan") for col in columns] for c in range(classes)]


def _axes(plt, groups):
    """A figure for one line per setting (the default colour cycle has 10 colours: tab20 beyond)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if len(groups) > 10:
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    return fig, ax


def _save(plt, fig, ax, drawn: bool, xlabel: str, ylabel: str, path) -> bool:
    """Label and write the figure if anything was drawn; close it either way. Returns `drawn`."""
    if drawn:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def _line_plot(plt, groups, labels, field, cumulative, ylabel, path) -> bool:
    fig, ax = _axes(plt, groups)
    drawn = False
    for group, label in zip(groups, labels):
        x, y = _per_epoch_mean(group, field, cumulative)
        if all(v != v for v in y):  # nothing logged (e.g. no signal for this method)
            continue
        ax.plot(x, y, marker="o", markersize=3, label=label)
        drawn = True
    return _save(plt, fig, ax, drawn, "epoch", ylabel, path)


def _compute_plot(plt, groups, labels, path) -> bool:
    """Top-1 against compute (full-data epochs), one colour per setting: the mean over seeds, each seed read
    off its own validation curve (top1_at_compute) at every compute where one of them evaluated and all
    of them have a value, and the band from the lowest seed to the highest. Settings whose runs did not
    count compute are left out."""
    fig, ax = _axes(plt, groups)
    drawn = False
    for group, label in zip(groups, labels):
        curves = [compute_curve(r) for r in group]
        if not all(curves):
            continue
        read = [(c, [top1_at_compute(curve, c) for curve in curves]) for c in sorted({c for k in curves for c, _ in k})]
        read = [(c, v) for c, v in read if None not in v]
        if not read:
            continue
        x, y = [c for c, _ in read], [v for _, v in read]
        (line,) = ax.plot(x, [statistics.fmean(v) for v in y], marker="o", markersize=3, label=label)
        if len(group) > 1:
            ax.fill_between(x, [min(v) for v in y], [max(v) for v in y], color=line.get_color(), alpha=0.2, lw=0)
        drawn = True
    return _save(plt, fig, ax, drawn, "compute (full-data epochs)", "top-1 (%)", path)


def _heatmaps(plt, groups, labels, path) -> bool:
    """Kept fraction per class (rows) per epoch (columns), one panel per method that blocks rows. Class
    ticks are labelled up to 30 classes; beyond that the panel still shows every class as a pixel row."""
    panels = [
        (label, class_kept_table(g))
        for g, label in zip(groups, labels)
        if any(m.get("samples_blocked", 0) > 0 for r in g for m in r.metrics)
    ]
    panels = [(label, table) for label, table in panels if table]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), dpi=110, squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, table) in zip(axes.flat, panels):
        image = ax.imshow(
            table, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower"
        )
        ax.set_title(textwrap.fill(label, 48), fontsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("class", fontsize=7)
        if len(table) <= 30:
            ax.set_yticks(range(len(table)))
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="kept fraction of the class's rows")
    fig.savefig(path)
    plt.close(fig)
    return True


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """Per epoch, means over seeds: top-1, cumulative training time, kept fraction, selection signal; top-1
    against compute (seeds as a band); and the kept fraction of each class per epoch as heatmaps."""
    try:
        import matplotlib  # optional: without it the report has no plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = group_runs(runs)
    labels = group_labels(groups)
    lines = [
        ("top1.png", "top1", False, "top-1 (%)"),
        ("wallclock.png", "epoch_seconds", True, "cumulative training time (s)"),
        ("kept_fraction.png", "kept_fraction", False, "kept fraction of sample-passes"),
        ("selection_signal.png", "selection_signal", False, "selection signal"),
    ]
    paths = [
        out / name
        for name, field, cumulative, ylabel in lines
        if _line_plot(plt, groups, labels, field, cumulative, ylabel, out / name)
    ]
    if _compute_plot(plt, groups, labels, out / "top1_vs_compute.png"):
        paths.append(out / "top1_vs_compute.png")
    if _heatmaps(plt, groups, labels, out / "class_kept_fraction.png"):
        paths.append(out / "class_kept_fraction.png")
    return paths


# What every run of one table shares: the data, the model and the image size. Runs that differ here are
# other experiments: their top-1 and time differences would mean nothing.
SAME_EXPERIMENT = (
    "data.dataset",
    "data.train_samples",
    "data.val_samples",
    "data.imbalance",
    "data.rare_classes",
    "data.img_size",
    "model.name",
    "model.cifar_stem",
)


def check_comparable(runs: list[Run], baseline: list[Run]) -> None:
    """Refuse (UserError, one line) a table that would compare unlike runs: a directory given twice, runs of
    another data set, model or image size than the baseline's (`SAME_EXPERIMENT`), baselines of more than one
    setting, or two runs of one setting with the same runtime.seed (a repeat is not another seed). A
    different data.root is only noted (the same data may sit at other paths)."""
    for given, label in ((baseline, "--baseline"), (runs, "RUN_DIR")):
        paths = [r.path.resolve() for r in given]
        twice = next((p for p in paths if paths.count(p) > 1), None)
        if twice is not None:
            raise UserError(f"run directory {twice} is given twice as {label}: each run counts once")
    reference = baseline[0]
    theirs = flatten(reference.config)
    roots = set()
    for run in baseline + runs:
        ours = flatten(run.config)
        for key in SAME_EXPERIMENT:
            if ours.get(key) != theirs.get(key):
                raise UserError(
                    f"run {run.path} has {key} {ours.get(key)!r}, the baseline {reference.path} has "
                    f"{theirs.get(key)!r}: a report compares runs of one data set, model and image size"
                )
        roots.add(ours.get("data.root"))
    if len(roots) > 1:
        print(
            f"note: the runs read data.root {', '.join(sorted(map(repr, roots)))}: compared as the same data",
            file=sys.stderr,
        )
    if len(group_runs(baseline)) > 1:
        raise UserError("the --baseline runs differ in more than their seed: give the seeds of one full-data setting")
    for group in group_runs(baseline + runs):
        seeds = [r.seed for r in group]
        repeated = next((s for s in seeds if seeds.count(s) > 1), None)
        if repeated is not None:
            same = [str(r.path) for r in group if r.seed == repeated]
            raise UserError(
                f"runs {same[0]} and {same[1]} are one setting with the same runtime.seed {repeated}: "
                "a repeat is not another seed; give one of them (or train with other seeds)"
            )


def report(run_dirs: list[str], baseline_dirs: list[str], out_dir: str, target=None, compute=None) -> dict:
    """Write report.md, report.csv and the plots of `run_dirs` against `baseline_dirs` (full data) to
    `out_dir`; a run directory given among both counts once, as a baseline. `target` / `compute`: see
    `table_rows`. Raises UserError for an unfinished run directory and for unlike runs (`check_comparable`)."""
    baseline = [load_run(p) for p in baseline_dirs]
    baseline_paths = {b.path.resolve() for b in baseline}
    others = [load_run(p) for p in run_dirs if Path(p).resolve() not in baseline_paths]
    check_comparable(others, baseline)
    runs = baseline + others
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs, baseline, target, compute)
    md = markdown_table(rows)
    (out / "report.md").write_text(md)
    write_csv(rows, out / "report.csv")
    plots = write_plots(runs, out)
    return {"rows": rows, "markdown": md, "plots": [str(p) for p in plots], "out": str(out)}
