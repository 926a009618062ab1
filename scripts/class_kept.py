"""Which classes each setting kept, from a folder of finished runs: the per-class view of a selection.

Runs are named `<setting>_s<seed>` (as scripts/reproduce_*.sh name them). For each setting, over its
seeds and the epochs that blocked rows (blocked_fraction > 0):

- `class_kept`: each class's kept fraction (class_kept_fraction, mean over epochs and seeds; null for
  a setting that blocked nothing);
- `kept_range`: its smallest and largest value; `signal`: the mean selection_signal;
- a group of classes against the rest: `group` (by default the run's data.rare_classes, else the
  upper half of the classes: the tail of data.imbalance's profile), `group_kept_ratio` (the group's
  mean kept fraction over the rest's), and the last epoch's top-1 of each (`group_top1`,
  `rest_top1`, mean over seeds).

Prints one JSON object per setting.

    python scripts/class_kept.py runs/fashion_mnist_classes/dense_rare
    python scripts/class_kept.py runs/fashion_mnist_classes/balanced --group 0 3 4 6 7
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from pfb_train.run_dir import read_metrics


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument(
        "--group",
        type=int,
        nargs="+",
        default=None,
        help="classes compared with the rest (default: data.rare_classes, else the upper half)",
    )
    a = p.parse_args()
    settings = defaultdict(list)
    for summary in sorted(a.folder.glob("*/summary.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", summary.parent.name)
        if match:
            settings[match[1]].append(summary.parent)
    for setting, runs in sorted(settings.items()):
        kept, signals, group_top1, rest_top1 = [], [], [], []
        group = a.group
        for run in runs:
            config = yaml.safe_load((run / "config.yaml").read_text())
            records = read_metrics(run)
            classes = len(records[0]["class_kept_fraction"])
            group = group or config["data"].get("rare_classes") or list(range(classes // 2, classes))
            blocking = [r for r in records if r.get("blocked_fraction", 0) > 0]
            kept += [r["class_kept_fraction"] for r in blocking]
            signals += [r.get("selection_signal") for r in blocking]
            last = next(r["val_class_top1"] for r in reversed(records) if "val_class_top1" in r)
            group_top1.append(mean([last[c] for c in group]))
            rest_top1.append(mean([t for c, t in enumerate(last) if c not in group]))
        out = {
            "setting": setting,
            "seeds": len(runs),
            "class_kept": None,
            "kept_range": None,
            "signal": None,
            "group": group,
            "group_kept_ratio": None,
        }
        if kept:  # a run that blocked nothing (full data) has only the top-1 columns
            per_class = [mean(column) for column in zip(*kept)]
            rest = [k for c, k in enumerate(per_class) if c not in group]
            out.update(
                class_kept=[round(k, 3) for k in per_class],
                kept_range=[round(min(per_class), 3), round(max(per_class), 3)],
                signal=None if mean(signals) is None else round(mean(signals), 3),
                group_kept_ratio=round(mean([per_class[c] for c in group]) / mean(rest), 3),
            )
        print(json.dumps({**out, "group_top1": round(mean(group_top1), 2), "rest_top1": round(mean(rest_top1), 2)}))


if __name__ == "__main__":
    main()
