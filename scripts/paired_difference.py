"""Top-1 of each setting minus a reference setting, paired by seed, from a folder of finished runs.

Runs are named `<setting>_s<seed>` (as scripts/reproduce_*.sh name them). Runs with the same
seed start from the same weights and see the same data order, so the per-seed difference
removes most of the seed-to-seed spread that mean ± std over separate runs carries. Prints one
JSON object per setting: mean and std of the paired differences in top-1 (points), and per
class (val_class_top1 at the last epoch), the mean difference.

    python scripts/paired_difference.py runs/fashion_mnist/balanced --reference random_r5 --match '_r5$'
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from pfb_train.run_dir import read_metrics


def load(folder: Path) -> dict:
    """{setting: {seed: (top1, per-class top-1)}} of the finished runs in `folder`."""
    runs = defaultdict(dict)
    for summary in sorted(folder.glob("*/summary.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", summary.parent.name)
        if not match:
            continue
        records = read_metrics(summary.parent)
        per_class = next((r["val_class_top1"] for r in reversed(records) if "val_class_top1" in r), None)
        runs[match[1]][int(match[2])] = (json.loads(summary.read_text())["top1"], per_class)
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--reference", required=True, help="setting name the others are compared with, e.g. random_r5")
    p.add_argument("--match", default="", help="compare only the settings whose name matches this regex")
    args = p.parse_args()
    runs = load(args.folder)
    if args.reference not in runs:
        raise SystemExit(f"no runs named {args.reference}_s<seed> in {args.folder}")
    reference = runs[args.reference]
    for setting, seeds in sorted(runs.items()):
        shared = sorted(set(seeds) & set(reference))
        if setting == args.reference or not shared or not re.search(args.match, setting):
            continue
        diffs = [seeds[s][0] - reference[s][0] for s in shared]
        per_class = None
        if all(seeds[s][1] and reference[s][1] for s in shared):
            per_class = [
                round(statistics.fmean(seeds[s][1][c] - reference[s][1][c] for s in shared), 2)
                for c in range(len(reference[shared[0]][1]))
            ]
        print(
            json.dumps(
                {
                    "setting": setting,
                    "reference": args.reference,
                    "seeds": shared,
                    "top1_diff": round(statistics.fmean(diffs), 3),
                    "top1_diff_std": round(statistics.stdev(diffs), 3) if len(diffs) > 1 else None,
                    "class_top1_diff": per_class,
                }
            )
        )


if __name__ == "__main__":
    main()
