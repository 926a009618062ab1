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

`--score-pass`: how far a cheaper ranking pass of recompute mode (`blocking.pfb.score_scale` /
`score_norm`, selection.score_pass.ScorePass) moves the blocked set from the exact pass (scale 1, batch
statistics). For each setting, two PFB selectors with the same seed and options (`--ratio`,
default 0.4 in this mode; `--centres`) see the same held-out batches: one is fed the exact pass's
features, the other the setting's; each selects and then updates its centres from its own features
of its kept rows, as in training, so each density model lives in its own feature space. Per line:

- `agreement`: the share of the exact pass's blocked rows that the cheaper pass blocks too (mean
  over batches), with PFB's default random term; `agreement_noise_free`: the same with noise 0,
  which isolates the density ranking. Scale 1.0 / batch is the exact pass itself (1.0: a check).
- references, the same on every line of a (data, model, state): `seed_agreement`, the exact pass
  against itself with another seed (default noise: how much PFB's own random term moves the set),
  and `random_reference`, what uniformly random blocking scores (blocked rows / batch rows, the ratio
  up to rounding).

Each model is measured in two states of its stage 1: `random_init` (timm's init, seed 0) and
`trained`, after `--train-steps` steps of plain SGD + cross-entropy (batch `--train-batch-size`) on
the training split; in `running` the first uses BatchNorm's init statistics (mean 0, var 1), the
second those of the brief training. The measured batches are held out of that training: the
validation split, topped up from the end of the training split (then left out of the training) where
it is too small (digits). `heldout_top1`: the trained model's accuracy on those batches.

    python scripts/selection_agreement.py --score-pass --data digits --models resnet18 resnet50 \
        --train-steps 300 150
    python scripts/selection_agreement.py --score-pass --data fashion_mnist \
        --root /usr/share/datasets/fashion-mnist --models resnet18 resnet50 --train-steps 300 150
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import timm
import torch

from pfb_train.config import DataConfig
from pfb_train.data import build_datasets
from pfb_train.models import split_model
from pfb_train.selection.score_pass import ScorePass
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
    p.add_argument(
        "--ratio", type=float, default=None, help="blocked share of each batch (default 0.5; --score-pass: 0.4)"
    )
    p.add_argument("--centres", type=int, default=64)
    p.add_argument(
        "--score-pass",
        action="store_true",
        help="measure cheaper ranking passes (score_scale x score_norm) against the exact one",
    )
    p.add_argument("--score-scales", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--score-norms", nargs="+", default=["batch", "running"], choices=["batch", "running"])
    p.add_argument(
        "--train-steps",
        nargs="+",
        type=int,
        default=[300],
        help="--score-pass: SGD steps of the brief training, one per model or one for all",
    )
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="--score-pass: SGD learning rate (momentum 0.9)")
    args = p.parse_args()
    if args.ratio is None:
        args.ratio = 0.4 if args.score_pass else 0.5
    if args.score_pass and len(args.train_steps) not in (1, len(args.models)):
        p.error(f"--train-steps: give one value, or one per model ({len(args.models)})")
    return args


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
    # one ranking over the batch (stratify none): these are the ranking's own properties, measured without labels
    pair = [
        build_selector(
            "pfb",
            stratify="none",
            ratio=ratio,
            centres=centres,
            feature_dim=dim,
            estimator=estimator,
            noise_form=form,
            noise=noise,
            centre_weights="uniform" if form == "max_abs" else "counts",
            seed=seed,
        )
        for seed in (0, 1)
    ]
    shared = blocked_total = 0
    for feats in batches:
        a, b = (blocked_rows(selector, feats) for selector in pair)
        shared += len(a & b)
        blocked_total += len(a)
    return {
        "signal": round(pair[0].epoch_diagnostics("cpu")["selection_signal"], 3),
        "seed_agreement": round(shared / blocked_total, 3),
        "noise": pair[0].noise,
    }


# -- --score-pass: cheaper ranking passes against the exact one ---------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def heldout_split(splits, n: int):
    """(measured images (n, C, H, W), their labels, training dataset): the validation split's first n
    samples, topped up from the end of the training split, which the training then leaves out."""
    val, train = splits.val, splits.train
    from_val = min(n, len(val))
    borrowed = n - from_val
    if borrowed >= len(train):
        raise SystemExit(f"--batches x --batch-size ({n}) leaves no training samples")
    items = [val[i] for i in range(from_val)] + [train[i] for i in range(len(train) - borrowed, len(train))]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items])
    return images, labels, torch.utils.data.Subset(train, range(len(train) - borrowed))


def brief_training(model, dataset, steps: int, batch_size: int, lr: float) -> float:
    """Plain SGD (momentum 0.9, no weight decay, constant rate) + cross-entropy, train mode; seconds taken."""
    start = time.time()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    order, pos = torch.randperm(len(dataset), generator=gen), 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(dataset), generator=gen), 0
        items = [dataset[int(i)] for i in order[pos : pos + batch_size]]
        pos += batch_size
        x, y = torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    return time.time() - start


@torch.no_grad()
def top1(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    try:
        correct = sum(
            int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size))
        )
    finally:
        model.train()
    return correct / len(labels)


def pfb_pair(ratio: float, centres: int, noise, seeds) -> list:
    return [
        build_selector("pfb", stratify="none", ratio=ratio, centres=centres, noise=noise, seed=seed) for seed in seeds
    ]


def blocked_agreement(reference, other, ref_batches, other_batches) -> float:
    """Mean over batches of the share of `reference`'s blocked rows that `other` blocks too."""
    shares = []
    for ref_feats, other_feats in zip(ref_batches, other_batches):
        a, b = blocked_rows(reference, ref_feats), blocked_rows(other, other_feats)
        shares.append(len(a & b) / len(a))
    return sum(shares) / len(shares)


def score_pass_rows(blocked, batches, args, head: dict):
    """One JSON object per (score_scale, score_norm) for the model in its current state."""
    blocked.train()  # `batch`: the training pass's normalisation; `running` switches to eval itself
    exact = [blocked.score_features(x) for x in batches]
    seed_agreement = blocked_agreement(*pfb_pair(args.ratio, args.centres, None, (0, 1)), exact, exact)
    random_reference = sum(round(args.ratio * f.shape[0]) / f.shape[0] for f in exact) / len(exact)
    for scale, norm in itertools.product(args.score_scales, args.score_norms):
        cheap = [blocked.score_features(x, ScorePass(scale, norm)) for x in batches]
        agreement = blocked_agreement(*pfb_pair(args.ratio, args.centres, None, (0, 0)), exact, cheap)
        noise_free = blocked_agreement(*pfb_pair(args.ratio, args.centres, 0.0, (0, 0)), exact, cheap)
        yield {
            **head,
            "score_scale": scale,
            "score_norm": norm,
            "ratio": args.ratio,
            "agreement": round(agreement, 4),
            "agreement_noise_free": round(noise_free, 4),
            "seed_agreement": round(seed_agreement, 4),
            "random_reference": round(random_reference, 4),
        }


def score_pass_main(args) -> None:
    cfg = DataConfig(dataset=args.data, root=args.root, img_size=args.img_size)
    splits = build_datasets(cfg)
    images, labels, train_set = heldout_split(splits, args.batches * args.batch_size)
    batches = list(images.split(args.batch_size))
    log(
        f"{args.data}: {len(batches)} held-out batches ({len(images)} images, {args.img_size} px); "
        f"brief training on {len(train_set)} images"
    )
    steps_of = dict(
        zip(args.models, args.train_steps * len(args.models) if len(args.train_steps) == 1 else args.train_steps)
    )
    for model_name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=splits.num_classes)
        blocked = split_model(model, stage=1)
        for state in ("random_init", "trained"):
            steps, heldout = 0, None
            if state == "trained":
                steps = steps_of[model_name]
                log(f"{model_name}: training {steps} steps of {args.train_batch_size}")
                seconds = brief_training(model, train_set, steps, args.train_batch_size, args.lr)
                heldout = round(top1(model, images, labels, args.batch_size), 4)
                log(f"{model_name}: trained in {seconds:.0f} s, held-out top-1 {heldout}")
            head = {
                "data": args.data,
                "model": model_name,
                "state": state,
                "train_steps": steps,
                "train_batch_size": args.train_batch_size if steps else None,
                "train_images": len(train_set) if steps else None,
                "heldout_top1": heldout,
                "img_size": args.img_size,
                "batches": len(batches),
                "batch_size": args.batch_size,
            }
            for row in score_pass_rows(blocked, batches, args, head):
                print(json.dumps(row), flush=True)


def main():
    args = parse_args()
    if args.score_pass:
        return score_pass_main(args)
    cfg = DataConfig(dataset=args.data, root=args.root, img_size=args.img_size)
    train = build_datasets(cfg).train
    n = min(len(train), args.batches * args.batch_size)
    images = torch.stack([train[i][0] for i in range(n)])
    for model_name in args.models:
        batches = shallow_features(model_name, images, args.batch_size)
        channels = batches[0].shape[1]
        for dim, (estimator, form, noise) in itertools.product(args.feature_dims, SETTINGS):
            result = measure(batches, args.ratio, args.centres, dim, estimator, form, noise)
            print(
                json.dumps(
                    {
                        "data": args.data,
                        "model": model_name,
                        "feature_dim": min(dim, channels),
                        "estimator": estimator,
                        "noise_form": form,
                        **result,
                        "ratio": args.ratio,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
