"""Stratified blocking: every class in a batch gives up the same share of its rows.

Density at a shallow stage measures how common an image's low-level statistics are, and
those differ by class: ranked over the whole batch, the densest rows cluster in a few
classes, which then lose most of their training (docs/RESULTS.md: Sneaker kept 0.35 of its
rows at ratio 0.5, and lost 4 points). Stratifying moves the choice inside each class: a
class of n rows in a batch of B blocks its share m * n / B of the m blocked rows, rounded by
largest remainder so the quotas add up to m exactly, and within the class its
highest-scored rows go.

Everything here is on the device with shapes known on the host (sorts and searchsorted, no
`unique`, no `nonzero`), so a step still never waits for the GPU and every rank keeps the same
number of rows.
"""

from __future__ import annotations

from typing import Optional

import torch


def sort_by_class(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the rows by class, and within a class by score, highest first.

    `scores`: (B,) float; `labels`: (B,) int64. Returns `order` (B,) int64, the row positions in
    that order; `within` (B,) int64, each sorted row's place in its class (0: its highest
    score); `size` (B,) int64, the row count of each sorted row's class in the batch. Ties in
    score keep the rows' batch order."""
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(labels[by_score], stable=True)]
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    after = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    within = torch.arange(order.shape[0], device=order.device) - first
    return order, within, after - first


def class_rank(scores: torch.Tensor, labels: torch.Tensor, ordered: Optional[tuple] = None) -> torch.Tensor:
    """Each row's rank among its own class's rows of the batch, scaled to [0, 1] (0: the class's
    lowest score, 1: its highest; a class's only row: 0). (B,) float32. `ordered`: sort_by_class(scores,
    labels) if the caller has it already (one sort per step instead of one per use)."""
    order, within, size = ordered or sort_by_class(scores, labels)
    sorted_rank = (size - 1 - within).float() / (size - 1).clamp_min(1).float()
    return torch.empty_like(sorted_rank).scatter_(0, order, sorted_rank)


def class_quotas(
    labels: torch.Tensor, blocked: int, generator: torch.Generator, ordered: Optional[tuple] = None
) -> torch.Tensor:
    """How many rows each row's class blocks: the largest-remainder split of `blocked` rows over the
    classes of the batch in proportion to their row counts.

    `labels`: (B,) int64; `blocked`: rows to block in all, 0 <= blocked < B (a host int). Returns
    (B,) int64, the quota of each row's class (every row of a class carries the same value). The
    quotas of the classes present add up to `blocked` exactly, and no class blocks all of its rows
    unless its exact share is all of them. Ties in remainder are broken by a draw from `generator`
    (on the labels' device), so no class index is favoured from batch to batch. `ordered`: any
    sort_by_class(..., labels) the caller has already (only the class blocks are read)."""
    rows = labels.shape[0]
    order, within, size = ordered or sort_by_class(torch.zeros(rows, device=labels.device), labels)
    share = blocked * size  # exact quota = share / rows
    base, remainder = share // rows, share % rows
    leader = within == 0  # one sorted row stands for its class
    # Remainders are integers, so a draw in [0, 1) only orders equal ones.
    key = torch.where(
        leader,
        remainder.double() + torch.rand(rows, device=labels.device, generator=generator, dtype=torch.float64),
        torch.full_like(base, -1.0, dtype=torch.float64),
    )
    extra_rows = blocked - (base * leader).sum()  # < number of classes present: the rounded-away parts
    place = torch.argsort(torch.argsort(key, descending=True, stable=True))  # 0: largest remainder
    extra = (leader & (place < extra_rows)).long()
    first = torch.arange(rows, device=labels.device) - within  # each sorted row's class leader
    sorted_quota = base + extra[first]
    return torch.empty_like(sorted_quota).scatter_(0, order, sorted_quota)


def block_within_classes(
    scores: torch.Tensor, labels: torch.Tensor, quotas: torch.Tensor, ordered: Optional[tuple] = None
) -> torch.Tensor:
    """(B,) bool: the rows blocked when each class blocks its `quotas` (from `class_quotas`) highest-scored
    rows. `scores`: (B,) float, higher = blocked first; `ordered`: sort_by_class(scores, labels), if known."""
    order, within, _ = ordered or sort_by_class(scores, labels)
    blocked_sorted = within < quotas[order]
    return torch.empty_like(blocked_sorted).scatter_(0, order, blocked_sorted)


def kept_rows(blocked: torch.Tensor, kept: int) -> torch.Tensor:
    """The positions of the `kept` rows not marked in `blocked` (B,) bool, ascending: (kept,) int64.
    A stable sort puts the unblocked rows first in batch order; `kept` is a host int, so no sync."""
    return torch.argsort(blocked.to(torch.uint8), stable=True)[:kept]
