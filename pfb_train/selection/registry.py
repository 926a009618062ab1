"""Selection methods by name. A method is one module that declares a `Method` and registers it.

A method declares:
- `name`: the value of `blocking.method`;
- `level`: where it drops work. `batch`: rows are blocked after the shallow part (the model is
  split, `blocking.mode` applies); `sampler`: samples are left out of the epoch before loading;
  `none`: nothing is dropped;
- `options`: a dataclass of its own settings with their defaults, read from `blocking.<name>`;
  its `check(run)` method (optional) validates them against the run and raises UserError;
  fields `score_scale` / `score_norm` (optional) set how recompute mode's ranking pass runs
  (selection.score_pass.ScorePass): the cost model and the model read them from there;
- `build(options, run)`: the Selector for a run.

Registration is one line in the method's module (`register(Method(...))`), or an entry point in the
`pfb_train.methods` group, so a method can live in another package:

    [options.entry_points]
    pfb_train.methods =
        my_method = my_package.my_module      # importing the module registers the method

Nothing outside a method's module names it: config, costs, info, report and engine ask this registry.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pfb_train.errors import UserError
from pfb_train.plugins import Registry
from pfb_train.selection.score_pass import NO_RANKING, ScorePass
from pfb_train.typed import coerce_fields  # typed like every other config key

LEVELS = ("none", "batch", "sampler")
ENTRY_POINT_GROUP = "pfb_train.methods"


@dataclass(frozen=True)
class RunFacts:
    """What a method may know about the run it is built for."""

    epochs: Optional[int] = None  # schedule.epochs (None: open-ended, e.g. a loop of one's own)
    batch_size: Optional[int] = None  # per process (None: not known in advance)
    seed: int = 0
    mode: str = "auto"  # blocking.mode as configured: auto | reuse | recompute
    num_classes: Optional[int] = None  # classes of the training set (None: not known in advance)


@dataclass(frozen=True)
class Method:
    name: str
    level: Literal["none", "batch", "sampler"]
    options: type  # a dataclass; every field has a default
    build: Callable[[Any, RunFacts], Any]  # (options, run) -> Selector
    summary: str = ""  # one line for `pfb-train methods` and the README table
    ratio_option: Optional[str] = None  # the option that says how much it drops (reports label runs by it)
    # Whether `select` reads the shallow features; False (random blocking): recompute mode runs no ranking
    # pass (selection.score_pass.NO_RANKING), so the blocked rows cost nothing at all.
    reads_features: bool = True

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"method {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")
        if not dataclasses.is_dataclass(self.options):
            raise ValueError(f"method {self.name!r}: options must be a dataclass")

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    @property
    def ratio_key(self) -> Optional[str]:
        """The config key of the ratio option (e.g. 'blocking.pfb.ratio'), for messages; None without one."""
        return f"blocking.{self.name}.{self.ratio_option}" if self.ratio_option else None

    def ratio(self, options) -> float:
        """How much the method drops, as its own option says (0 for full data)."""
        return float(getattr(options, self.ratio_option)) if self.ratio_option else 0.0

    def blocked_fraction_per_batch(self, options) -> float:
        """The fraction of each batch blocked while a batch-level method is active; 0 for the others."""
        return self.ratio(options) if self.level == "batch" else 0.0

    def score_pass(self, options) -> ScorePass:
        """How recompute mode's ranking pass runs, from the options `score_scale` and `score_norm`
        where the method has them (a method that ranks by shallow features may); else exact. None for a
        method whose selection reads no features (`reads_features`): NO_RANKING."""
        if not self.reads_features:
            return NO_RANKING
        return ScorePass(getattr(options, "score_scale", 1.0), getattr(options, "score_norm", "batch"))


_REGISTRY = Registry("selection method", ENTRY_POINT_GROUP)
register, unregister = _REGISTRY.register, _REGISTRY.unregister


def methods() -> dict[str, Method]:
    """Every registered method, by name (built-ins first, then plug-ins)."""
    return _REGISTRY.all()


def get_method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise UserError(f"unknown blocking.method '{name}'; choose one of: {', '.join(known)}")
    return known[name]


def make_options(method: Method, values: dict, where: str):
    """The method's options dataclass from a mapping; an unknown key is one line naming the valid ones."""
    valid = method.option_names()
    for key in values:
        if key not in valid:
            matches = difflib.get_close_matches(str(key), valid, n=1)
            close = matches[0] if matches else None
            hint = f"did you mean '{where}.{close}'? " if close else ""
            listed = ", ".join(valid) if valid else "none"
            raise UserError(
                f"config key '{where}.{key}' is not an option of method '{method.name}' ({hint}its options: {listed})"
            )
    return method.options(**coerce_fields(method.options, values, where))


def check_options(method: Method, options, run: RunFacts) -> None:
    """The method's own validation against the run; messages name the full config key."""
    check = getattr(options, "check", None)
    if check is not None:
        check(run, lambda option: f"blocking.{method.name}.{option}")


def configure(name: str, run: RunFacts, **options):
    """(method, its options dataclass) from a name and options by keyword, validated as a config would be."""
    method = get_method(name)
    values = make_options(method, options, f"blocking.{name}")
    check_options(method, values, run)
    return method, values


def build(name: str, run: RunFacts, **options):
    """A Selector from a method name and its options by keyword."""
    method, values = configure(name, run, **options)
    return method.build(values, run)
