"""Blocking inside a training loop: the public API, and the one implementation the harness uses too.

A step with blocking is: run the split model on the batch (the method picks the rows that go
on past the shallow part), compute the per-sample loss of the kept rows, take the method's
weighted mean, step, and let the method observe what happened. In a loop of one's own:

    blocking = pfb_train.Blocking(model, "pfb", ratio=0.4, epochs=epochs)   # splits the model
    net = blocking.model                                                   # or DDP(blocking.model)
    ...
        blocking.set_epoch(epoch)                                          # once per epoch
        with torch.autocast("cuda", dtype=torch.bfloat16):
            batch = blocking.forward(net, x, y)                            # kept rows only
        losses = F.cross_entropy(batch.logits.float(), batch.targets, reduction="none")
        blocking.loss(batch, losses).backward(); optimizer.step()
        blocking.observe(batch, losses)

(examples/own_loop.py is a complete script.) The harness's engine calls the same functions
(`forward`, `weighted_mean`, `observe` below) with its own selector.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from pfb_train.costs import cheaper_mode
from pfb_train.models import BlockedModel, check_score_pass, split_model
from pfb_train.selection import RunFacts, Selector
from pfb_train.selection.registry import configure


class BlockedBatch(NamedTuple):
    """What one blocked forward pass gives the loss and the selector."""

    logits: torch.Tensor  # (kept, classes): the rows that took the full forward
    targets: torch.Tensor  # their targets (class indices, or mixup's soft targets)
    indices: Optional[torch.Tensor]  # their dataset indices (None if the caller passed none)
    keep: Optional[torch.Tensor]  # kept row positions in the batch; None when every row was kept
    feats: Optional[torch.Tensor]  # (B, C) pooled shallow features of every row (float32), if the method uses them
    labels: Optional[torch.Tensor] = None  # (B,) int64 class of every row (mixup/cutmix: the dominant one), for tallies
    # (B,) and (kept,) bool: the row holds a sample, not an unreadable file's stand-in (None without indices)
    present: Optional[torch.Tensor] = None
    kept_present: Optional[torch.Tensor] = None


def forward(
    model: nn.Module,
    selector: Selector,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    mark: Optional[Callable[[str], None]] = None,
) -> BlockedBatch:
    """Run `model` (a BlockedModel, or DDP around one) on a batch, blocking as `selector` decides.
    Epochs without blocking run the plain model: no second shallow pass in recompute mode.
    Shapes and dtypes as `Blocking.forward` gives them. `mark(phase)`: the caller's timer, called as the
    shallow part ends ("shallow") and as the selection does ("select"), so the timer stays out of the model."""
    labels = dominant_labels(y)  # once per step: the selection and the caller's tallies read them
    present = None if indices is None else holds_sample(indices)  # once per step: the loss and the tallies read it

    def select(feats: torch.Tensor) -> Optional[torch.Tensor]:
        if mark is None:
            return selector.select(feats, labels)
        mark("shallow")
        keep = selector.select(feats, labels)
        mark("select")
        return keep

    out = model(
        x,
        select=select if selector.blocks_rows() else None,
        features=selector.needs_features(),
        score=selector.score_pass(),
    )
    if out.keep is None:
        return BlockedBatch(out.logits, y, indices, None, out.feats, labels, present, present)
    kept_indices = None if indices is None else indices.index_select(0, out.keep)
    kept_present = None if present is None else present.index_select(0, out.keep)
    kept_y = y.index_select(0, out.keep)
    return BlockedBatch(out.logits, kept_y, kept_indices, out.keep, out.feats, labels, present, kept_present)


def dominant_labels(y: torch.Tensor) -> torch.Tensor:
    """(B,) int64 classes of (B,) int64 targets or of (B, classes) soft ones (mixup/cutmix: the largest share)."""
    return y.argmax(dim=1) if y.dtype.is_floating_point else y


def holds_sample(indices: torch.Tensor) -> torch.Tensor:
    """Rows that hold a sample; an unreadable file's stand-in has a negative index, see data/missing.py."""
    return indices >= 0


def weighted_mean(selector: Selector, batch: BlockedBatch, losses: torch.Tensor) -> torch.Tensor:
    """The loss to optimise: the mean of the kept samples' losses, weighted where the method weights rows.
    Stand-ins of unreadable files weigh nothing (and the mean is over the samples that are there)."""
    if batch.indices is None:
        return losses.mean()
    kept_present = (
        holds_sample(batch.indices) if batch.kept_present is None else batch.kept_present
    )  # None: made by hand
    present = kept_present.to(losses.dtype)
    weights = selector.loss_weights(batch.indices)
    weighted = losses * present if weights is None else losses * weights * present
    return weighted.sum() / present.sum().clamp_min(1)


def observe(selector: Selector, batch: BlockedBatch, losses: torch.Tensor) -> None:
    """After the optimizer step: the method updates its state (PFB's centres, InfoBatch's scores).
    Methods leave rows with a negative index (stand-ins) out of their update."""
    # the kept rows' targets: free for class indices (a gather of the batch's labels would be a kernel per step)
    selector.observe(batch.feats, batch.keep, batch.indices, losses.detach(), dominant_labels(batch.targets))


class Blocking:
    """A model split for blocking plus a selection method, for a training loop of one's own.

    `model`: a timm model (split after `stage`) or a BlockedModel. `method` and `**options`: a
    registered method and its options, as in the config's `blocking.<method>` section (checked
    the same way). `mode`: reuse | recompute | auto (the cheaper for the method's ratio). `epochs`:
    the run's length, for methods whose options are stated in epochs (start_epoch, delta).

    Call `observe` for each batch after its `forward` and before the next `forward` (PFB's
    `stratify: percentile` carries each batch's density ranks from one to the other).
    Under DDP, wrap `blocking.model` once and pass the wrapper to `forward`; every rank blocks the
    same number of rows, so gradients all-reduce as usual. Under autocast, run `forward` inside it
    and compute the loss on `logits.float()`: the density math runs in float32 regardless.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "pfb",
        stage: Union[int, str] = 1,
        mode: str = "auto",
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        seed: int = 0,
        **options,
    ):
        timm_model = model.model if isinstance(model, BlockedModel) else model
        run = RunFacts(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            mode=model.mode if isinstance(model, BlockedModel) else mode,
            num_classes=getattr(timm_model, "num_classes", None),
        )  # timm models say (density 'class')
        spec, values = configure(method, run, **options)
        self.selector = spec.build(values, run)
        if isinstance(model, BlockedModel):
            self.model = model
        else:
            self.model = split_model(model, stage, "reuse" if mode == "auto" else mode)
            if mode == "auto":
                blocked_fraction = spec.blocked_fraction_per_batch(values)
                scale = self.model.resolve_score(spec.score_pass(values)).scale  # at the model's own input size
                assert scale is not None  # resolved
                self.model.mode = cheaper_mode(blocked_fraction, scale) if blocked_fraction > 0 else "reuse"
        size = getattr(self.model.model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
        check_score_pass(self.model, spec.score_pass(values), size, f"blocking.{method}")  # as the harness does

    def set_epoch(self, epoch: int) -> None:
        self.selector.set_epoch(epoch)

    def epoch_indices(self, num_samples: int) -> Optional[torch.Tensor]:
        """Sampler-level methods: the dataset indices to visit this epoch (None: all)."""
        return self.selector.epoch_indices(num_samples)

    def forward(self, model: nn.Module, x, y, indices=None) -> BlockedBatch:
        """The batch through `model` (`self.model`, or DDP around it), the blocked rows stopped after the
        shallow part.

        `x`: (B, C, H, W) images, float (or what the model's stem takes), on the model's device.
        `y`: (B,) int64 classes, or (B, classes) float soft targets (mixup/cutmix); only reindexed.
        `indices`: (B,) int64 dataset indices, or None; needed by sampler-level methods (InfoBatch: its
        loss weights and scores are per sample); a negative index marks a row with no sample (left out
        of the loss and of the method's update).
        Returns BlockedBatch: `logits` (k, classes) of the k kept rows, in the forward's dtype (autocast's
        under autocast); `targets` their rows of `y`; `indices` their rows of `indices` (or None); `keep`
        (k,) int64 sorted row positions in the batch, None when every row was kept (k = B); `feats`
        (B, C') float32 pooled shallow features of every row (C': the split stage's channels), or None
        in an epoch where the method neither selects rows nor uses them; `labels` (B,) int64 the class of
        every row (mixup/cutmix: the dominant one); `present` (B,) and `kept_present` (k,) bool, the rows
        that hold a sample (None without `indices`).
        k is the same on every rank and every step of an epoch (DDP all-reduces as usual).
        Raises ValueError (PFB: a first batch smaller than `centres`), and whatever the model raises
        on an input it does not take (RuntimeError on a wrong shape or device)."""
        return forward(model, self.selector, x, y, indices)

    def loss(self, batch: BlockedBatch, losses: torch.Tensor) -> torch.Tensor:
        """The loss to optimise: a 0-dim tensor, the mean of `losses` over the kept rows that hold a
        sample, weighted where the method weights rows (InfoBatch's rescaling; needs `indices`).

        `losses`: (k,) per-row losses of the kept rows (`reduction="none"`), float32 as computed on
        `batch.logits.float()`; the result has their dtype and keeps their graph. Raises nothing of its
        own: a `losses` of another length than `batch.logits` fails in the arithmetic (RuntimeError), an
        index past the dataset a weighting method was built for fails in its lookup (IndexError)."""
        return weighted_mean(self.selector, batch, losses)

    def observe(self, batch: BlockedBatch, losses: torch.Tensor) -> None:
        """After the optimizer step: the method updates its state from this batch (PFB: its centres, from
        `batch.feats`; InfoBatch: its per-sample scores, from `losses` and `batch.indices`, gathered from
        every rank). `losses`: the (k,) per-row losses given to `loss` (detached here). Returns nothing;
        under DDP every rank must call it (InfoBatch's gather is collective). Raises ValueError (PFB: a
        first batch smaller than `centres`)."""
        observe(self.selector, batch, losses)

    def state_dict(self) -> dict:
        """This process's selection state. Under DDP the entries named in `selector.rank_local` (random
        streams, PFB's per-epoch diagnostics) differ between ranks: save each rank's (or gather them)
        and give every rank its own back, or a resumed run draws rank 0's noise on every rank."""
        return self.selector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state)
