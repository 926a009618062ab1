"""What each selection blocks, on synthetic stage-1-like features at 10, 100 and 1000 classes.

The features: every class has a weak offset, and each of its rows either a *typical* look (near one
of a few modes shared by all classes: dense) or a *spread* one (broad). Two sets:

- `look`: balanced classes; half of them 70 % typical ("dense" classes), half 10 % ("sparse").
  *capture*: the share of typical rows among the blocked ones (density's signal; random = ratio's
  share of typical rows, 0.40). *balance*: the kept fraction of the dense classes over that of the
  sparse ones (1.0: no class starved for looking alike).
- `rare`: every class 40 % typical, half of the classes 10x rarer in the data. *rare_kept*: the kept
  fraction of the rare classes over that of the frequent ones (> 1: rarity protected).

Each selector streams `--warmup` steps without blocking (the centres and class histories learn, as in
the epochs before a blocking window), then `--steps` blocking steps that are measured: select on the
whole batch, observe as the training loop does. Prints one JSON object per (set, classes, selection);
a few seconds per line on a CPU.

    python scripts/bench_selection.py                      # 256 rows, ratio 0.4, 64 centres
    python scripts/bench_selection.py --classes 1000 --stratify percentile
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pfb_train.selection import build_selector

SELECTIONS = ("none", "label", "percentile", "random")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument(
        "--stratify",
        nargs="+",
        default=list(SELECTIONS),
        choices=SELECTIONS,
        help="PFB's stratify choices to run; 'random' is random blocking",
    )
    p.add_argument("--sets", nargs="+", default=["look", "rare"], choices=["look", "rare"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--centres", type=int, default=64)
    p.add_argument("--dim", type=int, default=64, help="feature dimension (stage 1 of a ResNet: 64)")
    p.add_argument("--warmup", type=int, default=100, help="steps before blocking starts")
    p.add_argument("--steps", type=int, default=200, help="measured blocking steps")
    p.add_argument(
        "--noise", type=float, default=None, help="PFB's rank noise level (default: the option's default, 0.5)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Features:
    """Draws batches of (features (B, D) float32, labels (B,) int64, typical (B,) bool)."""

    def __init__(self, kind: str, classes: int, dim: int, gen: torch.Generator, modes: int = 4):
        self.gen, self.dim = gen, dim
        self.modes = 3.0 * torch.randn(modes, dim, generator=gen)
        self.offsets = 0.5 * torch.randn(classes, dim, generator=gen)  # weak: classes overlap at stage 1
        half = torch.arange(classes) < classes // 2
        if kind == "look":  # first half dense (70 % typical), second half sparse (10 %)
            self.typical_share = torch.where(half, 0.7, 0.1)
            self.frequency = torch.ones(classes)
        else:  # all alike; the second half 10x rarer
            self.typical_share = torch.full((classes,), 0.4)
            self.frequency = torch.where(half, 1.0, 0.1)
        self.group = half  # dense classes (look) / frequent classes (rare)

    def batch(self, rows: int):
        labels = torch.multinomial(self.frequency, rows, replacement=True, generator=self.gen)
        typical = torch.rand(rows, generator=self.gen) < self.typical_share[labels]
        mode = self.modes[torch.randint(len(self.modes), (rows,), generator=self.gen)]
        noise = torch.randn(rows, self.dim, generator=self.gen)
        feats = self.offsets[labels] + torch.where(typical.unsqueeze(1), mode + 0.5 * noise, 2.0 * noise)
        return feats, labels, typical


def measure(kind: str, classes: int, selection: str, a) -> dict:
    gen = torch.Generator().manual_seed(a.seed)
    data = Features(kind, classes, a.dim, gen)
    options = dict(ratio=a.ratio, start_epoch=1, seed=a.seed)
    if selection != "random":
        options.update(centres=a.centres, feature_dim=a.dim, stratify=selection, noise=a.noise)
    selector = build_selector(
        "pfb" if selection != "random" else "random", batch_size=a.batch, num_classes=classes, **options
    )
    indices = torch.arange(a.batch)
    selector.set_epoch(0)
    for _ in range(a.warmup):
        feats, labels, _ = data.batch(a.batch)
        if selector.needs_features():
            selector.observe(feats, None, indices, None, labels)
    selector.set_epoch(1)
    blocked_typical = blocked_rows = 0
    kept_by_group, rows_by_group = torch.zeros(2), torch.zeros(2)
    seconds = 0.0
    for _ in range(a.steps):
        feats, labels, typical = data.batch(a.batch)
        started = time.perf_counter()
        keep = selector.select(feats, labels)
        kept = torch.zeros(a.batch, dtype=torch.bool)
        kept[keep] = True
        if selector.needs_features():
            selector.observe(feats, keep, indices[keep], None, labels[keep])
        seconds += time.perf_counter() - started
        blocked_typical += int((typical & ~kept).sum())
        blocked_rows += int((~kept).sum())
        group = data.group[labels].long()
        kept_by_group += torch.zeros(2).index_add_(0, group, kept.float())
        rows_by_group += torch.bincount(group, minlength=2).float()
    kept_share = kept_by_group / rows_by_group  # [group 0: sparse / rare, group 1: dense / frequent]
    out = {
        "set": kind,
        "classes": classes,
        "selection": selection,
        "rows": a.batch,
        "ratio": a.ratio,
        "noise": None if selection == "random" else selector.noise,
        "blocked": round(blocked_rows / (a.batch * a.steps), 4),
        "capture": round(blocked_typical / max(blocked_rows, 1), 3),
        "select_observe_ms": round(1000 * seconds / a.steps, 3),
    }
    if kind == "look":
        out["balance"] = round(float(kept_share[1] / kept_share[0]), 3)  # dense over sparse
    else:
        out["rare_kept"] = round(float(kept_share[0] / kept_share[1]), 3)  # rare over frequent
    return out


def main():
    a = parse_args()
    torch.set_num_threads(1)
    for kind in a.sets:
        for classes in a.classes:
            for selection in a.stratify:
                print(json.dumps(measure(kind, classes, selection, a)), flush=True)


if __name__ == "__main__":
    main()
