"""Selection methods behind one interface (base.Selector), found by name in the registry.

Importing this package registers the built-in methods; plug-ins register themselves through the
`pfb_train.methods` entry point group (registry.py)."""

from __future__ import annotations

from typing import Optional

# Importing a method's module registers it; this order is the order `methods()` lists them in.
from pfb_train.selection import none, random, pfb, infobatch, static_random  # noqa: F401, I001
from pfb_train.selection.base import BlockingSchedule, Selector, WindowOptions
from pfb_train.selection.registry import Method, RunFacts, build, get_method, methods, register, unregister


def build_selector(
    name: str,
    seed: int = 0,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    **options,
) -> Selector:
    """A method by name, its options by keyword, validated as the config would validate them.
    `epochs` / `batch_size` / `num_classes` describe the run where a method needs them (None: not known)."""
    return build(name, RunFacts(epochs=epochs, batch_size=batch_size, seed=seed, num_classes=num_classes), **options)


def selector_from_config(cfg, num_classes: Optional[int] = None) -> Selector:
    """The configured method, built for a training set of `num_classes` classes."""
    method = get_method(cfg.blocking.method)
    run = RunFacts(
        epochs=cfg.schedule.epochs,
        batch_size=cfg.data.batch_size,
        seed=cfg.runtime.seed,
        mode=cfg.blocking.mode,
        num_classes=num_classes,
    )
    return method.build(cfg.blocking.chosen(), run)


__all__ = [
    "BlockingSchedule",
    "Method",
    "RunFacts",
    "Selector",
    "WindowOptions",
    "build_selector",
    "get_method",
    "methods",
    "register",
    "selector_from_config",
    "unregister",
]
