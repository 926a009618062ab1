"""Partial Forward Blocking: block the most common samples by density of their shallow features.

Density is a kernel estimate over K centres that follow the data online (Adaptive
Distribution Estimation). All density math runs in float32 under disabled autocast:
log-kernels of 128-dim features underflow in half precision. Options beyond the paper:
`stratify: percentile` ranks each row by its density's percentile in its own class's history,
scaled by the class's share of the data (percentile.py); `stratify: label` ranks rows inside
their class, each class blocking its share of the batch (stratify.py); `density: class` scores a
row under its own class's mixture of the centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from pfb_train.distributed import all_reduce_sum, broadcast
from pfb_train.errors import UserError
from pfb_train.selection.score_pass import AUTO_SCORE, ScorePass
from pfb_train.selection.base import BlockingSchedule, Selector, WindowOptions, need
from pfb_train.selection.diagnostics import SelectionStats, batch_ranks, within_batch_rank
from pfb_train.selection.percentile import ClassPercentiles
from pfb_train.selection.registry import Method, register
from pfb_train.selection.stratify import block_within_classes, class_quotas, class_rank, kept_rows, sort_by_class


def reduce_features(feats: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C) pooled features -> (B, min(dim, C)) by averaging adjacent channel groups."""
    feats = feats.float()
    if feats.shape[1] <= dim:
        return feats
    return F.adaptive_avg_pool1d(feats.unsqueeze(1), dim).squeeze(1)


def silverman_bandwidth(centres: torch.Tensor) -> torch.Tensor:
    """Per-dimension bandwidth h_d = (4/(D+2))^(1/(D+4)) * K^(-1/(D+4)) * std_d of the centres."""
    k, d = centres.shape
    factor = (4.0 / (d + 2)) ** (1.0 / (d + 4)) * k ** (-1.0 / (d + 4))
    std = centres.std(dim=0).clamp_min(1e-6)  # identical centres must not give a zero bandwidth
    return factor * std


def log_gaussian(v: torch.Tensor, centres: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(B, K) log N(v_i - c_j; 0, diag(var))."""
    diff = v.unsqueeze(1) - centres.unsqueeze(0)  # (B, K, D)
    maha = (diff.square() / var).sum(-1)
    return -0.5 * (maha + var.log().sum() + v.shape[1] * math.log(2 * math.pi))


def kde_log_density(v, centres, weights) -> torch.Tensor:
    """The paper's estimate: log sum_j (w_j / K) N(v - c_j; 0, diag(h^2)), via logsumexp.
    `weights`: (K,) for every row alike, or (B, K), one weighting per row (class-conditional)."""
    h = silverman_bandwidth(centres)
    log_w = weights.clamp_min(1e-12).log() - math.log(centres.shape[0])
    return torch.logsumexp(log_w + log_gaussian(v, centres, h.square()), dim=1)


def mean_log_kernel(v, centres) -> torch.Tensor:
    """The authors' code: mean_j log N(v - c_j; 0, diag(h)) (h itself as the variance)."""
    h = silverman_bandwidth(centres)
    return log_gaussian(v, centres, h).mean(dim=1)


# The random term, three forms (blocking.noise_form). Each maps clean scores s (higher = more
# common) to perturbed scores; the selection blocks the highest perturbed scores.
NOISE_FORMS = ("rank", "density_floor", "max_abs")
# none: one ranking over the batch; label: each class blocks its share of the batch (stratify.py);
# percentile: one ranking over the batch by the row's percentile in its class's history (percentile.py)
STRATIFY = ("none", "label", "percentile")
DENSITIES = ("marginal", "class")  # p(v) over all samples, or p(v | y) under the row's own class
# rank 0.5: of 0.05 / 0.2 / 0.5, the level that trained best on the Fashion-MNIST study (docs/RESULTS.md);
# the literal forms' defaults are the paper's and the code's values.
DEFAULT_NOISE = {"rank": 0.5, "density_floor": 0.01, "max_abs": 0.1}


def add_noise(
    s: torch.Tensor,
    form: str,
    level: float,
    gen: torch.Generator,
    labels: Optional[torch.Tensor] = None,
    ordered: Optional[tuple] = None,
) -> torch.Tensor:
    """Perturb the scores of one batch for diversity (one random draw per row).

    - `rank`: rank(s)/(B-1) + level * N(0, 1). Depends on the order of the scores only, so the
      same level is the same amount of diversity for any estimator, feature dimension or
      density normalisation: level 0.1 moves a row by about a tenth of the batch's ranking.
      With `labels` (stratified selection, which compares rows of a class only) the rank is
      among the row's own class, so the level keeps that meaning inside each class (`ordered`:
      stratify.sort_by_class(s, labels), if the caller has it).
    - `density_floor` (the paper's): importance 1 / (f + alpha * max f), alpha ~ U(0, level); in
      log space logaddexp(s, log alpha + max s). Invariant to a constant added to s (a density
      scale), not to s scaled: log-densities spread in proportion to the feature dimension, so
      at large D most rows sit under the floor and their order is random.
    - `max_abs` (the authors' code): s + level * N(0, 1) * max |s|. Invariant to s scaled, not to
      a constant added: on a log-density, max |s| is the normalising constant, not the spread.
    """
    if level == 0:
        return s
    if form == "rank":
        rank = within_batch_rank(s) if labels is None else class_rank(s, labels, ordered)
        return rank + level * torch.randn(s.shape, device=s.device, generator=gen)
    if form == "density_floor":
        alpha = torch.rand(s.shape, device=s.device, generator=gen) * level
        return torch.logaddexp(s, alpha.clamp_min(1e-30).log() + s.max())
    if form == "max_abs":
        return s + level * torch.randn(s.shape, device=s.device, generator=gen) * s.abs().max()
    raise ValueError(f"unknown noise form {form!r}; choose one of: {', '.join(NOISE_FORMS)}")


class PFBSelector(Selector):
    name = "pfb"

    def __init__(
        self,
        schedule: BlockingSchedule,
        centres: int = 64,
        feature_dim: int = 128,
        update_rate: float = 0.01,
        estimator: str = "kde",
        noise: Optional[float] = None,
        noise_form: str = "rank",
        centre_weights: str = "counts",
        seed: int = 0,
        score: ScorePass = AUTO_SCORE,
        stratify: str = "none",
        density: str = "marginal",
        num_classes: Optional[int] = None,
        class_memory: float = 256.0,
    ):
        super().__init__(seed)
        if stratify not in STRATIFY:
            raise ValueError(f"unknown stratify {stratify!r}; choose one of: {', '.join(STRATIFY)}")
        if density not in DENSITIES:
            raise ValueError(f"unknown density {density!r}; choose one of: {', '.join(DENSITIES)}")
        if density == "class" and (estimator != "kde" or centre_weights != "counts" or not num_classes):
            raise ValueError(
                "density 'class' weighs the centres by each class's assignments: it needs estimator "
                f"'kde', centre_weights 'counts' and num_classes (got {estimator!r}, {centre_weights!r}, "
                f"{num_classes})"
            )
        if stratify == "percentile" and not num_classes:
            raise ValueError(
                "stratify 'percentile' keeps a history per class: it needs num_classes (the model's "
                "number of classes), or another stratify ('label', 'none')"
            )
        if stratify == "percentile" and noise_form != "rank":
            raise ValueError(
                f"stratify 'percentile' scores a class percentile, not a log-density: noise_form "
                f"{noise_form!r} does not apply to it; use noise_form 'rank'"
            )
        self.stratify, self.density_kind, self.num_classes = stratify, density, num_classes
        self.class_percentiles = ClassPercentiles(num_classes, class_memory) if stratify == "percentile" else None
        # (batch ranks, labels) of every row, from `select` to the same step's `observe`
        self._pending_ranks: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.score = score
        if noise_form not in NOISE_FORMS:
            raise ValueError(f"unknown noise form {noise_form!r}; choose one of: {', '.join(NOISE_FORMS)}")
        self.schedule = schedule
        self.num_centres, self.feature_dim, self.update_rate = centres, feature_dim, update_rate
        self.estimator, self.weighting = estimator, centre_weights
        self.noise_form = noise_form
        self.noise = noise if noise is not None else DEFAULT_NOISE[noise_form]
        self.centres: Optional[torch.Tensor] = None  # (K, D) float32, identical on every rank
        self.counts: Optional[torch.Tensor] = None  # (K,) assignments so far
        self.class_counts: Optional[torch.Tensor] = None  # (num_classes, K) assignments by class (density 'class')
        self.stats = SelectionStats()

    # -- density ---------------------------------------------------------------------------

    def _init_centres(self, v: torch.Tensor) -> None:
        if v.shape[0] < self.num_centres:
            raise ValueError(
                f"pfb needs a first batch of at least {self.num_centres} samples (blocking.pfb.centres), got {v.shape[0]}"
            )
        self.centres = broadcast(v[: self.num_centres].clone().contiguous())
        self.counts = torch.zeros(self.num_centres, device=v.device)
        if self.density_kind == "class":
            assert self.num_classes is not None  # density 'class' is refused without it (__init__)
            self.class_counts = torch.zeros(self.num_classes, self.num_centres, device=v.device)

    def _ensure_centres(self, v: torch.Tensor) -> None:
        if self.centres is None:
            self._init_centres(v)
        elif self.centres.device != v.device:  # restored from a checkpoint loaded on the CPU
            centres, counts = self._density_state()
            self.centres, self.counts = centres.to(v.device), counts.to(v.device)
            if self.class_counts is not None:
                self.class_counts = self.class_counts.to(v.device)

    def _density_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(centres, counts): set together, by the first batch (`_ensure_centres`) or a checkpoint."""
        centres, counts = self.centres, self.counts
        assert centres is not None and counts is not None, "no centres yet: _ensure_centres first"
        return centres, counts

    def density(self, v: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Density score per row (higher = more common), without the random term: (B,) float32.

        `v`: (B, D) float32 reduced features. `labels`: (B,) int64 classes, needed by density 'class':
        each row's density is then under its own class's mixture, the shared centres weighted by how
        many of that class's samples each has taken (log p(v | y); a class not seen yet: uniform)."""
        centres, seen = self._density_state()
        if self.estimator == "mean_log_kernel":
            return mean_log_kernel(v, centres)
        if self.density_kind == "class":
            if labels is None:
                raise ValueError("density 'class' needs the batch's labels")
            assert self.class_counts is not None  # created with the centres under density 'class'
            counts = self.class_counts.index_select(0, labels)  # (B, K)
            weights = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
            weights = torch.where(counts.sum(dim=1, keepdim=True) > 0, weights, 1.0 / self.num_centres)
        elif self.weighting == "counts":  # all-zero counts (nothing observed yet) act as uniform weights
            weights = seen / seen.sum().clamp_min(1)
        else:
            weights = torch.full_like(seen, 1.0 / self.num_centres)
        return kde_log_density(v, centres, weights)

    def blocks_rows(self) -> bool:
        return self.schedule.ratio_at(self.position) > 0

    def score_pass(self) -> ScorePass:
        return self.score

    def needs_features(self) -> bool:  # the centres follow the data from the first epoch until blocking ends
        return self.schedule.end is None or self.position < self.schedule.end

    def select(self, feats: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Keep the k rarest rows (Selector.select); with stratify 'percentile', the k lowest
        class-history scores (percentile.py); with stratify 'label', the rarest of each class, every
        class keeping its share (stratify.py). Raises ValueError when `labels` is None and the options
        need them (stratify 'label' or 'percentile', density 'class')."""
        batch = feats.shape[0]
        k = self.schedule.kept(batch, self.position)
        if k == batch:
            return None
        with torch.autocast(feats.device.type, enabled=False):
            v = reduce_features(feats, self.feature_dim)
            self._ensure_centres(v)
            clean = self.density(v, labels)
            gen = self.generator(v.device)
            if self.stratify == "none":
                order = torch.argsort(add_noise(clean, self.noise_form, self.noise, gen))
                keep, blocked = order[:k].sort().values, order[k:]  # keep the k rarest rows
                self.stats.add(clean, keep, blocked)
                return keep
            if labels is None:
                raise ValueError(f"stratify {self.stratify!r} needs the batch's labels")
            if self.stratify == "percentile":
                assert self.class_percentiles is not None  # made for stratify 'percentile' (__init__)
                ranks = within_batch_rank(clean)
                self._pending_ranks = (ranks, labels)  # the class histories learn from every row, in `observe`
                score = self.class_percentiles.score(ranks, labels, gen)
                order = torch.argsort(add_noise(score, self.noise_form, self.noise, gen))
                keep, blocked = order[:k].sort().values, order[k:]  # keep the k lowest scores
                # the signal: would the class-history score alone block these rows (the quantiles stay the density's)
                self.stats.add(clean, keep, blocked, by_density=batch_ranks(score) >= k)
                return keep
            by_clean = sort_by_class(clean, labels)  # one sort serves the quotas, the rank noise and the signal
            quotas = class_quotas(labels, batch - k, gen, by_clean)
            noisy = add_noise(clean, self.noise_form, self.noise, gen, labels, by_clean)
            blocked_rows = block_within_classes(noisy, labels, quotas)
            keep, blocked = kept_rows(blocked_rows, k), kept_rows(~blocked_rows, batch - k)
            # the signal asks the same question inside the classes: would the density alone block these rows?
            self.stats.add(clean, keep, blocked, by_density=block_within_classes(clean, labels, quotas, by_clean))
        return keep

    # -- Adaptive Distribution Estimation -----------------------------------------------------

    def observe(self, feats, keep, indices, losses, labels=None) -> None:
        """Move each centre toward the mean of the retained features nearest to it (density 'class':
        and count each kept row's class at its nearest centre, from `labels`; stratify 'percentile':
        add every row's batch density rank to its class's history)."""
        pending, self._pending_ranks = self._pending_ranks, None
        if feats is None or not self.needs_features():
            return  # after blocking ends: no density work at all
        with torch.autocast(feats.device.type, enabled=False):
            v = reduce_features(feats if keep is None else feats.index_select(0, keep), self.feature_dim)
            self._ensure_centres(v)
            # stand-ins of unreadable files (index < 0) move no centre
            weight = None if indices is None else (indices >= 0).to(v.dtype)
            history = None
            if self.class_percentiles is not None and labels is not None:
                if keep is None:  # nothing blocked (before the window): rank every row here, before the centres move
                    ranks, row_labels, row_weight = within_batch_rank(self.density(v, labels)), labels, weight
                else:  # ranked by this step's `select`, which cannot tell the rows that hold no sample
                    if pending is None or pending[0].shape[0] != feats.shape[0]:
                        raise ValueError(
                            "stratify 'percentile': observe() got a blocked batch that no select() "
                            "ranked; call observe after each forward of a batch, before the next forward"
                        )
                    (ranks, row_labels), row_weight = pending, None
                history = self.class_percentiles.batch_counts(ranks, row_labels, row_weight)
            self.update_centres(v, weight, labels, history)

    def update_centres(
        self,
        v: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        history: Optional[torch.Tensor] = None,
    ) -> None:
        """`v`: (rows, D) float32; `weight`: (rows,) 1 for a sample, 0 for a row to leave out (None: all
        count); `labels`: (rows,) int64 classes, needed by density 'class' (ValueError without);
        `history`: (C, BINS) float32, this rank's class-history counts (stratify 'percentile'), summed
        over ranks in the same all-reduce."""
        centres, seen = self._density_state()
        weight = torch.ones_like(v[:, 0]) if weight is None else weight
        nearest = torch.cdist(v, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, v * weight.unsqueeze(1))
        counts = torch.zeros_like(seen).index_add_(0, nearest, weight)  # bincount would sync
        parts = [sums, counts.unsqueeze(1)]
        if self.class_counts is not None:
            if labels is None:
                raise ValueError("density 'class' needs the kept rows' labels")
            by_class = torch.zeros_like(self.class_counts).index_put_((labels, nearest), weight, accumulate=True)
            parts.append(by_class.T)
        # One all-reduce of sums and counts keeps the centres (and the class histories) bit-identical across ranks.
        packed = torch.cat(parts, dim=1)
        if history is None:
            packed = all_reduce_sum(packed)
        else:
            reduced = all_reduce_sum(torch.cat([packed.flatten(), history.flatten()]))
            packed, history = reduced[: packed.numel()].view_as(packed), reduced[packed.numel() :].view_as(history)
            assert self.class_percentiles is not None  # a history comes with stratify 'percentile' (observe)
            self.class_percentiles.add(history)
        d = centres.shape[1]
        sums, counts = packed[:, :d], packed[:, d]
        means = sums / counts.clamp_min(1).unsqueeze(1)
        moved = torch.lerp(centres, means, self.update_rate)
        self.centres = torch.where(counts.unsqueeze(1) > 0, moved, centres)
        self.counts = seen + counts
        if self.class_counts is not None:
            self.class_counts = self.class_counts + packed[:, d + 1 :].T

    def epoch_diagnostics(self, device) -> dict:
        return self.stats.read(device)

    rank_local = (*Selector.rank_local, "stats")  # the epoch's diagnostics so far, this rank's steps

    @staticmethod
    def merge_rank_states(states: list[dict]) -> dict:
        return {"stats": SelectionStats.merge([s.get("stats") for s in states])}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "centres": self.centres,
            "counts": self.counts,
            "class_counts": self.class_counts,
            "stats": self.stats.state_dict(),
            "class_history": None if self.class_percentiles is None else self.class_percentiles.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.centres, self.counts = state["centres"], state["counts"]
        self.class_counts = state["class_counts"]  # None: trained with the marginal density
        if self.density_kind == "class" and self.class_counts is None and self.centres is not None:
            raise UserError(
                "cannot resume with blocking.pfb.density 'class': the checkpoint's PFB state has no class "
                "counts (it was trained with density 'marginal'); set blocking.pfb.density=marginal to go "
                "on, or start a new run (name=...)"
            )
        self.stats.load_state_dict(state.get("stats"))
        if self.class_percentiles is not None and state.get("class_history"):
            self.class_percentiles.load_state_dict(state["class_history"])


@dataclass
class PFBOptions(WindowOptions):
    centres: int = 64  # K: centres of the online density model, initialised from the first batch
    feature_dim: int = 128  # D: pooled shallow features are reduced to this many dims
    update_rate: float = 0.01  # step size of the centre update (Adaptive Distribution Estimation)
    estimator: Literal["kde", "mean_log_kernel"] = "kde"
    noise: Optional[float] = None  # level of the random term; None: the noise form's default
    noise_form: Literal["rank", "density_floor", "max_abs"] = "rank"  # scale-free | paper | authors' code
    centre_weights: Literal["counts", "uniform"] = "counts"  # paper (counts) or authors' code (uniform)
    # recompute mode's ranking pass (selection.score_pass.ScorePass): the batch resized by score_scale, normalised by
    # its own (batch) or the running statistics. The kept rows' training pass is full size either way.
    # null / auto: half size and running statistics where the model takes them (docs/RESULTS.md).
    score_scale: Optional[float] = None
    score_norm: Literal["auto", "batch", "running"] = "auto"
    # percentile (the default): one ranking over the batch by each row's density percentile in its class's
    # history, scaled by the class's share of the data: every class keeps its share at any number of classes per
    # batch, and rare classes keep more. On Fashion-MNIST it beat random blocking on both long-tailed sets and
    # matched label on the balanced one (docs/RESULTS.md). label: every class of a batch blocks the same share
    # of its rows, its densest ones (needs several rows of a class per batch). none: the paper's one ranking.
    stratify: Literal["none", "label", "percentile"] = "percentile"
    # class: a row's density under its own class's mixture (shared centres, weighted by that class's
    # assignments): "common" means common for its class. Needs estimator kde and centre_weights counts.
    density: Literal["marginal", "class"] = "marginal"
    # stratify percentile: how many of a class's latest rows its history of density ranks holds (an
    # exponential average; a balanced class's share): fewer follows changing features faster, more
    # gives finer percentiles
    class_memory: float = 256.0

    def check(self, run, key) -> None:
        super().check(run, key)
        need(
            self.score_scale is None or 0.0 < self.score_scale <= 1.0,
            f"config key '{key('score_scale')}' must be in (0, 1] or null (auto), got {self.score_scale}",
        )
        cheaper = self.score_scale not in (None, 1.0) or self.score_norm == "running"
        need(
            not (cheaper and run.mode == "reuse"),
            f"config keys '{key('score_scale')}' / '{key('score_norm')}' shape recompute mode's ranking pass; "
            "blocking.mode 'reuse' ranks by the training pass's own features: set blocking.mode recompute or auto",
        )
        need(self.centres >= 2, f"config key '{key('centres')}' must be >= 2, got {self.centres}")
        need(self.feature_dim >= 1, f"config key '{key('feature_dim')}' must be >= 1, got {self.feature_dim}")
        need(
            1 <= self.class_memory < math.inf,
            f"config key '{key('class_memory')}' must be >= 1 (rows per class) and finite, got {self.class_memory}",
        )
        need(
            self.stratify != "percentile" or self.noise_form == "rank",
            f"config key '{key('stratify')}' 'percentile' scores a class percentile, not a log-density: "
            f"'{key('noise_form')}' {self.noise_form} does not apply to it; set {key('noise_form')}=rank",
        )
        need(
            0.0 < self.update_rate <= 1.0,
            f"config key '{key('update_rate')}' must be in (0, 1], got {self.update_rate}",
        )
        need(self.noise is None or self.noise >= 0, f"config key '{key('noise')}' must be >= 0, got {self.noise}")
        need(
            self.density == "marginal" or (self.estimator == "kde" and self.centre_weights == "counts"),
            f"config key '{key('density')}' 'class' weighs the centres by each class's assignments: it needs "
            f"'{key('estimator')}' kde and '{key('centre_weights')}' counts (got {self.estimator}, {self.centre_weights})",
        )
        need(
            run.batch_size is None or run.batch_size >= self.centres,
            f"config key 'data.batch_size' ({run.batch_size}) must be >= '{key('centres')}' ({self.centres}): "
            "centres are initialised from the first batch",
        )


def build(o: PFBOptions, run) -> PFBSelector:
    return PFBSelector(
        o.schedule(run.epochs),
        centres=o.centres,
        feature_dim=o.feature_dim,
        update_rate=o.update_rate,
        estimator=o.estimator,
        noise=o.noise,
        noise_form=o.noise_form,
        centre_weights=o.centre_weights,
        seed=run.seed,
        score=ScorePass(o.score_scale, o.score_norm),
        stratify=o.stratify,
        density=o.density,
        num_classes=run.num_classes,
        class_memory=o.class_memory,
    )


register(
    Method(
        "pfb",
        level="batch",
        options=PFBOptions,
        build=build,
        ratio_option="ratio",
        summary="the `ratio` of each batch with the highest shallow-feature density is blocked (ICCV 2025)",
    )
)
