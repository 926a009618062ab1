"""How much of PFB's blocked set the density decides, for each estimator, feature size and random term.

Batches of real images go through the shallow part (stem + stage 1) of a randomly initialised
timm model; one PFB selector per setting scores them, blocks `--ratio` of each batch and
updates its centres from the kept rows, as in training. Two numbers per setting:

- `signal`: the share of the blocked rows that the same selector's scores without the random
  term would also have blocked (its `selection_signal`); `--ratio` is what random blocking scores.
- `seed_agreement`: the share of the blocked rows that a second selector, seeded differently and
  fed the same batches, blocks too.

Prints one JSON object per line.

    python scripts/selection_agreement.py --data digits --models resnet18 resnet50
"""

from __future__ import annotations

import argparse
import itertools
import json

import timm
import torch

from pfb_train.config import DataConfig
from pfb_train.data import build_datasets
from pfb_train.models import split_model
from pfb_train.selection import build_selector

SETTINGS = [  # (estimator, noise form, noise level); level None: the form's default
    ("kde", "density_floor", None),  # the paper's literal form
    ("mean_log_kernel", "max_abs", None),  # the authors' code's literal form
    ("kde", "rank", 0.05),
    ("kde", "rank", None),
    ("kde", "rank", 0.2),
    ("kde", "rank", 0.5),
    ("mean_log_kernel", "rank", None),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"])
    p.add_argument("--root", default=None, help="fashion_mnist: folder of the idx files")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--feature-dims", nargs="+", type=int, default=[32, 128])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--centres", type=int, default=64)
    return p.parse_args()


@torch.no_grad()
def shallow_features(model_name: str, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    blocked = split_model(timm.create_model(model_name, num_classes=10), stage=1)  # train mode: batch statistics
    return [blocked.pooled_features(blocked.shallow(x)) for x in images.split(batch_size)]


def blocked_rows(selector, feats: torch.Tensor) -> set:
    keep = selector.select(feats)
    selector.observe(feats, keep, None, None)
    return set(range(feats.shape[0])) - set(keep.tolist())


def measure(batches, ratio, centres, dim, estimator, form, noise) -> dict:
    pair = [build_selector("pfb", ratio=ratio, centres=centres, feature_dim=dim, estimator=estimator,
                           noise_form=form, noise=noise, centre_weights="uniform" if form == "max_abs" else "counts",
                           seed=seed) for seed in (0, 1)]
    shared = blocked_total = 0
    for feats in batches:
        a, b = (blocked_rows(selector, feats) for selector in pair)
        shared += len(a & b)
        blocked_total += len(a)
    return {"signal": round(pair[0].epoch_diagnostics("cpu")["selection_signal"], 3),
            "seed_agreement": round(shared / blocked_total, 3), "noise": pair[0].noise}


def main():
    args = parse_args()
    cfg = DataConfig(dataset=args.data, root=args.root, img_size=args.img_size)
    train = build_datasets(cfg).train
    n = min(len(train), args.batches * args.batch_size)
    images = torch.stack([train[i][0] for i in range(n)])
    for model_name in args.models:
        batches = shallow_features(model_name, images, args.batch_size)
        channels = batches[0].shape[1]
        for dim, (estimator, form, noise) in itertools.product(args.feature_dims, SETTINGS):
            result = measure(batches, args.ratio, args.centres, dim, estimator, form, noise)
            print(json.dumps({"data": args.data, "model": model_name, "feature_dim": min(dim, channels),
                              "estimator": estimator, "noise_form": form, **result, "ratio": args.ratio}),
                  flush=True)


if __name__ == "__main__":
    main()
