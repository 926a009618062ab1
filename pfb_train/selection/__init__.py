"""Selection methods behind one interface: `build_selector(name, ratio=..., **options)`."""

from __future__ import annotations

from pfb_train.errors import UserError
from pfb_train.selection.base import BlockingSchedule, Selector
from pfb_train.selection.infobatch import InfoBatchSelector, StaticRandomSelector
from pfb_train.selection.none import NoSelector
from pfb_train.selection.pfb import PFBSelector
from pfb_train.selection.random import RandomSelector

METHODS = {"none": NoSelector, "random": RandomSelector, "pfb": PFBSelector, "infobatch": InfoBatchSelector,
           "static_random": StaticRandomSelector}


def build_selector(name: str, ratio: float = 0.0, start_epoch: int = 0, end_epoch=None, ramp: str = "constant",
                   seed: int = 0, **options) -> Selector:
    if name not in METHODS:
        raise UserError(f"unknown blocking.method '{name}'; choose one of: {', '.join(METHODS)}")
    if name == "none":
        return NoSelector(seed)
    if name == "infobatch":
        return InfoBatchSelector(ratio, seed=seed, **options)
    if name == "static_random":
        return StaticRandomSelector(ratio, seed=seed)
    schedule = BlockingSchedule(ratio, start_epoch, end_epoch, ramp)
    if name == "random":
        return RandomSelector(schedule, seed=seed)
    return PFBSelector(schedule, seed=seed, **options)


def selector_from_config(cfg) -> Selector:
    b = cfg.blocking
    end = b.end_epoch if b.end_epoch is not None else cfg.schedule.epochs
    options = {}
    if b.method == "infobatch":
        options = dict(epochs=cfg.schedule.epochs, delta=b.delta)
    if b.method == "pfb":
        options = dict(centers=b.centers, feature_dim=b.feature_dim, ema=b.ema, estimator=b.estimator,
                       noise=b.noise, noise_form=b.noise_form, weights=b.weights)
    return build_selector(b.method, ratio=b.ratio, start_epoch=b.start_epoch, end_epoch=end, ramp=b.ramp,
                          seed=cfg.runtime.seed, **options)


__all__ = ["BlockingSchedule", "Selector", "build_selector", "selector_from_config", "METHODS"]
