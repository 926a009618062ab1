"""Typed run configuration: dataclasses, YAML loading, `--set` overrides, validation.

The dataclass field types are the schema: loading checks every key and value against
them, so a typo or a wrong type is reported with the key's full dotted name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import yaml
from timm.data import create_transform
from timm.optim import list_optimizers

from pfb_train.data.registry import get_source, sources
from pfb_train.errors import UserError, first_line
from pfb_train.selection import methods  # importing the package registers the built-in methods
from pfb_train.selection.registry import RunFacts, check_options, get_method, make_options
from pfb_train.typed import coerce, unknown_key

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    name: str = "resnet18"
    pretrained: bool = False
    num_classes: Optional[int] = None  # None: taken from the dataset
    drop_rate: float = 0.0
    drop_path: float = 0.0
    cifar_stem: bool = False  # ResNet family: 3x3 stride-1 first conv and no max-pool, for 32 px inputs


def _all_method_options() -> dict:
    return {name: method.options() for name, method in methods().items()}


@dataclass
class BlockingConfig:
    """Which selection method runs and where the model is split. Each registered method's own
    options are a section `blocking.<method>` (e.g. `blocking.pfb.ratio`), typed by the dataclass the
    method declares; sections of methods not chosen are kept (a recipe can hold every method it is
    compared with) but do nothing."""

    method: str = "none"  # a registered method: `pfb-train methods` lists them
    stage: Union[int, str] = 1  # split after this body stage (index from 1, or module name)
    mode: Literal["auto", "reuse", "recompute"] = "auto"  # auto: the cheaper by the cost model (pfb_train/costs.py)
    options: dict = field(default_factory=_all_method_options)  # method name -> its options dataclass

    def chosen(self):
        """The options of the method that runs."""
        return self.options[self.method]


@dataclass
class DataConfig:
    """What the run trains and validates on. `dataset` names a registered source (data/registry.py); each
    source says which of the keys below it reads (`pfb-train datasets` lists them)."""

    dataset: str = "synthetic"  # a registered data source (data/registry.py): `pfb-train datasets` lists them
    root: Optional[str] = None  # where the source reads from: a folder, a Hub name, ...
    download: bool = False  # sources that can fetch their files: do so if they are missing (never otherwise)
    img_size: int = 224
    batch_size: int = 256  # per process
    eval_batch_size: Optional[int] = None  # None: same as batch_size
    workers: Optional[int] = None  # DataLoader workers per process; None: this process's share of the CPUs, at most 8
    train_samples: Optional[int] = None  # a fixed class-stratified subset (None: all), or a generated set's size
    val_samples: Optional[int] = None  # the same for validation
    imbalance: float = 1.0  # < 1: long-tailed training set, the last class keeps this fraction of its samples
    rare_classes: Optional[list[int]] = (
        None  # with imbalance < 1: these classes keep `imbalance` of their samples, the rest all
    )
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: Optional[str] = None  # timm policy string, e.g. "rand-m9-mstd0.5"
    bad_images: Literal["skip", "fail"] = "skip"  # unreadable images are stood in for and counted, or fatal
    # sources of stored images: decode + augment in CPU workers (cpu), on the training device with
    # torchvision (device), or in NVIDIA DALI (dali: nvJPEG on a GPU, DALI's CPU operators without one)
    decode: Literal["cpu", "device", "dali"] = "cpu"
    train_split: str = "train"  # sources with named splits: the split names
    val_split: str = "validation"
    image_key: Optional[str] = None  # sources of tables: the image column (None: the only one)
    label_key: Optional[str] = None  # the class-label column (None: the only one)
    shuffle_window: int = (
        8192  # sharded sources: a sample moves at most this many places from its place in the shard stream
    )


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name
    lr: float = 0.1  # the peak LR, at any batch size (not read when lr_base is set)
    # The peak LR per lr_base_size samples of the global batch (per process x processes), scaled linearly
    # with it, as timm's --lr-base: a recipe then keeps its meaning at any batch and number of GPUs.
    lr_base: Optional[float] = None
    lr_base_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = None
    # Micro-batches of data.batch_size per optimizer step (gradient accumulation): the global batch is
    # data.batch_size x processes x accum_steps; rows are blocked in each micro-batch.
    accum_steps: int = 1
    ema_decay: Optional[float] = None  # keep a timm ModelEmaV3 of the weights and evaluate it too


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # any timm scheduler name
    epochs: int = 90  # the schedule's length in epochs; with a budget, its shape, stretched over the budget
    warmup_epochs: int = 5
    warmup_lr: float = 1.0e-5
    min_lr: float = 0.0
    # The run's training compute (budget_unit epochs: full-data epochs of this model, image size and data
    # set, counted by the cost model from each step's realised rows) or training seconds (budget_unit
    # seconds, evaluation excluded). The run stops at the step where it is spent, and everything stated
    # in epochs (warm-up, decay, blocking windows, InfoBatch's delta) is a share of `epochs`, stretched
    # over the budget (budget.py). None: the run trains `epochs` epochs.
    budget: Optional[float] = None
    budget_unit: Literal["epochs", "seconds"] = "epochs"


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False  # torch.compile the shallow and deep parts (the selection stays eager)
    cudnn_benchmark: bool = True  # CUDA: autotune conv kernels for the step's fixed shapes (not bit-reproducible)
    tf32: bool = True  # CUDA: TensorFloat-32 matmuls and convs in float32 runs
    sync_bn: bool = False  # SyncBatchNorm across ranks (multi-process runs only)
    seed: int = 0
    output: str = "runs"
    baseline: Optional[str] = None  # a finished full-data run directory: each epoch is compared with it
    resume: Optional[str] = None  # auto (runs/<name>, fresh if no checkpoint), a run directory, or a checkpoint
    checkpoint_every: Optional[int] = None  # also checkpoint every N optimizer steps (None: at epoch ends only)
    save_best: bool = True  # keep checkpoint-best.pt and export/best (the best top-1's weights); false: last only
    export: bool = True  # write the weights as timm models (export/last, best, ema: model.safetensors + config.json)
    # Skip and count steps whose gradients are not finite. None: on the CPU only. On CUDA its one
    # host sync per step cost 6.6 % of a resnet50 bf16 step on an H200 (docs/BENCHMARKS.md); there a
    # non-finite loss instead stops the run at the end of its epoch (counted on the device, no sync).
    check_finite: Optional[bool] = None
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    log_every: int = 50
    eval_every: int = 1
    progress: bool = True  # tqdm bar on rank 0
    threads: Optional[int] = None  # torch CPU threads; None: torch's default


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    blocking: BlockingConfig = field(default_factory=BlockingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self, chosen_only: bool = False) -> dict:
        """Plain nested dicts, as the YAML is written (`blocking.<method>` sections); `chosen_only`
        keeps only the section of the method that runs (what tells experiments apart)."""
        data = dataclasses.asdict(self)
        sections = data["blocking"].pop("options")
        if chosen_only:
            sections = {self.blocking.method: sections[self.blocking.method]}
        data["blocking"].update(sections)
        return data


# ---------------------------------------------------------------- the blocking section


BLOCKING_KEYS = ("method", "stage", "mode")


# The flat `blocking:` keys of versions before method sections, and the options they became (for the one
# line that refuses them; scripts/upgrade_run_logs.py rewrites stored run directories with it).
MOVED_FLAT_KEYS = {
    "ratio": {"pfb": "ratio", "random": "ratio", "infobatch": "prune_ratio", "static_random": "drop_fraction"},
    "start_epoch": {"pfb": "start_epoch", "random": "start_epoch"},
    "end_epoch": {"pfb": "end_epoch", "random": "end_epoch"},
    "ramp": {"pfb": "ramp", "random": "ramp"},
    "centers": {"pfb": "centres"},
    "feature_dim": {"pfb": "feature_dim"},
    "ema": {"pfb": "update_rate"},
    "estimator": {"pfb": "estimator"},
    "noise": {"pfb": "noise"},
    "noise_form": {"pfb": "noise_form"},
    "weights": {"pfb": "centre_weights"},
    "delta": {"infobatch": "delta"},
}


def unknown_blocking_key(key: str, known: dict) -> UserError:
    """The error for `blocking.<key>` that is neither a plain key nor a method: a flat key of an earlier
    version says where it moved; anything else lists the valid names."""
    moved = MOVED_FLAT_KEYS.get(key)
    if moved is None:
        return unknown_key(key, "blocking.", [*BLOCKING_KEYS, *known])
    where = ", ".join(f"blocking.{method}.{option}" for method, option in moved.items())
    return UserError(
        f"config key 'blocking.{key}' is a flat key of an earlier version: each method's options now "
        f"live in its own section ({where}); scripts/upgrade_run_logs.py rewrites a stored run's config"
    )


def _build_blocking(data: dict) -> BlockingConfig:
    """`blocking:` with the plain keys (method, stage, mode) and one section per method."""
    known = methods()
    plain = {k: v for k, v in data.items() if k in BLOCKING_KEYS}
    cfg = _build(BlockingConfig, plain, "blocking.", custom=False)
    get_method(cfg.method)  # an unknown method is one line listing the registered ones
    sections: dict = {}
    for key, value in data.items():
        if key in BLOCKING_KEYS:
            continue
        if key in known:
            if value is not None and not isinstance(value, dict):
                raise UserError(
                    f"config section 'blocking.{key}' must be a mapping of method '{key}' options, got {value!r}"
                )
            sections.setdefault(key, {}).update(value or {})
            continue
        raise unknown_blocking_key(str(key), known)
    cfg.options = {name: make_options(m, sections.get(name, {}), f"blocking.{name}") for name, m in known.items()}
    return cfg


def _build(cls, data: dict, prefix: str = "", custom: bool = True):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    if cls is BlockingConfig and custom:
        return _build_blocking(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(str(key), prefix, names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value) -> None:
    """Write `value` at `dotted` (e.g. 'blocking.ratio') into nested dict `data`."""
    parts = dotted.split(".")
    cls: object = Config  # the config dataclass `part` is a key of: Config, then a section's
    node = data
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        prefix = ".".join(parts[:i]) + "." if i else ""
        if cls is BlockingConfig and part not in BLOCKING_KEYS:
            _set_blocking(node, parts, i, dotted, value)
            return
        if part not in hints:
            raise unknown_key(part, prefix, list(hints))
        tp = hints[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise UserError(
                    f"--set {dotted}: '{dotted}' is a section; set one of its keys, e.g. {dotted}.{next(iter(typing.get_type_hints(tp)))}"
                )
            if node.get(part) is None:  # absent or an empty YAML section
                node[part] = {}
            if not isinstance(node[part], dict):
                raise UserError(f"config section '{'.'.join(parts[: i + 1])}' must be a mapping, got {node[part]!r}")
            node, cls = node[part], tp
        elif not last:
            raise UserError(f"--set {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
        else:
            node[part] = value


def _set_blocking(node: dict, parts: list[str], i: int, dotted: str, value) -> None:
    """`--set blocking.<method>.<option>=v`."""
    known = methods()
    part, rest = parts[i], parts[i + 1 :]
    if part in known:
        if len(rest) != 1:
            raise UserError(
                f"--set {dotted}: give one option of method '{part}', e.g. blocking.{part}."
                f"{(known[part].option_names() or ['<none>'])[0]}=..."
            )
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node[part][rest[0]] = value  # checked against the method's options when the config is built
        return
    raise unknown_blocking_key(part, known)


# ---------------------------------------------------------------- loading


def resolve_config_path(name: str) -> Path:
    """A path as given, or a bare name (with or without .yaml) from the shipped configs/."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for candidate in (SHIPPED_CONFIGS / name, SHIPPED_CONFIGS / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")) if SHIPPED_CONFIGS.is_dir() else []
    hint = f"; shipped configs: {', '.join(shipped)}" if shipped else ""
    raise UserError(f"config file not found: {name}{hint}")


def parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. blocking.ratio=0.3), got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_yaml(file: Path) -> dict:
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {file}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {file} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(name: str, chain: tuple = ()) -> dict:
    """YAML as a dict; `base: other.yaml` (next to this file, or shipped) is loaded first and overridden."""
    file = resolve_config_path(name) if not chain else _resolve_base(name, chain[-1])
    if file.resolve() in chain:
        raise UserError(f"config file {file}: 'base' chain loops back to itself")
    data = _read_yaml(file)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"config key 'base' in {file} must be a file name, got {base!r}")
    return _merge(read_config_file(base, chain + (file.resolve(),)), data)


def _resolve_base(name: str, including: Path) -> Path:
    sibling = including.parent / name
    return sibling if sibling.is_file() else resolve_config_path(name)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None), apply `key=value` overrides, validate."""
    data = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def flatten(config: dict, prefix: str = "") -> dict:
    """{'blocking': {'ratio': 0.4}} -> {'blocking.ratio': 0.4}"""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiment_settings(raw: dict) -> dict:
    """A run directory's config.yaml as the resolved settings of what was trained, only the chosen method's
    section kept (the other methods' defaults may change between versions without changing what was
    trained)."""
    try:
        return _build(Config, raw).to_dict(chosen_only=True)
    except UserError:  # keys or a method this version does not know: compare it as written, chosen section only
        blocking = raw.get("blocking")
        if not isinstance(blocking, dict):
            return raw
        chosen = blocking.get("method")
        return {**raw, "blocking": {k: v for k, v in blocking.items() if not isinstance(v, dict) or k == chosen}}


def step_rows(cfg: Config) -> int:
    """Rows of one optimizer step on one process: data.batch_size x optim.accum_steps (the train loader's batch)."""
    return cfg.data.batch_size * cfg.optim.accum_steps


def global_batch_words(cfg: Config, world_size: int) -> str:
    """'data.batch_size B x N process(es)' (and ' x optim.accum_steps A' where A > 1), for messages."""
    accum = f" x optim.accum_steps {cfg.optim.accum_steps}" if cfg.optim.accum_steps > 1 else ""
    return f"data.batch_size {cfg.data.batch_size} x {world_size} process(es){accum}"


def peak_lr(o: OptimConfig, global_batch: int) -> float:
    """The peak LR of a run whose optimizer steps take `global_batch` samples (step_rows x processes):
    optim.lr, or optim.lr_base x global_batch / optim.lr_base_size (linear scaling, timm's --lr-base)."""
    return o.lr if o.lr_base is None else o.lr_base * global_batch / o.lr_base_size


def need(ok: bool, message: str) -> None:
    """Raise UserError(`message`) unless `ok`."""
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express; the method checks its own options.
    Raises UserError naming the first config key that is out of range."""
    s = cfg.schedule
    need(
        cfg.name not in ("", ".", "..") and "/" not in cfg.name and "\\" not in cfg.name,
        f"config key 'name' must be a plain folder name (no '/', not '.' or '..'), got {cfg.name!r}",
    )
    need(
        cfg.model.num_classes is None or cfg.model.num_classes >= 1,
        f"config key 'model.num_classes' must be >= 1 (or null: the data set's), got {cfg.model.num_classes}",
    )
    need(s.epochs >= 1, f"config key 'schedule.epochs' must be >= 1, got {s.epochs}")
    need(s.warmup_epochs >= 0, f"config key 'schedule.warmup_epochs' must be >= 0, got {s.warmup_epochs}")
    need(
        s.budget is None or 0 < s.budget < math.inf,
        f"config key 'schedule.budget' must be > 0 and finite ({s.budget_unit}), or null, got {s.budget}",
    )
    need(
        s.budget is not None or s.budget_unit == "epochs",
        f"config key 'schedule.budget_unit' {s.budget_unit!r} needs a schedule.budget to count in it",
    )
    check_blocking(cfg)
    check_data(cfg.data)
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:  # timm's Mixup pairs each row of the step's batch with its mirror
        rows = step_rows(cfg)
        accum = f" x optim.accum_steps {cfg.optim.accum_steps}" if cfg.optim.accum_steps > 1 else ""
        need(rows % 2 == 0, f"mixup/cutmix need an even 'data.batch_size'{accum}, got {rows}")
    check_optim_and_runtime(cfg.optim, cfg.runtime)
    check_timm_values(cfg)


def check_blocking(cfg: Config) -> None:
    """The chosen method's options against the run, and every other method's options on their own."""
    b, s, seed = cfg.blocking, cfg.schedule, cfg.runtime.seed
    facts = RunFacts(epochs=s.epochs, batch_size=cfg.data.batch_size, seed=seed, mode=b.mode)
    check_options(get_method(b.method), b.chosen(), facts)
    # A value its method cannot take is an error whichever method runs; what depends on the run
    # (batch size, mode) is checked for the chosen method only.
    for name, other in methods().items():
        if name != b.method:
            try:
                check_options(other, b.options[name], RunFacts(epochs=s.epochs, seed=seed))
            except UserError as e:
                raise UserError(f"{e} (method '{name}' reads it; blocking.method is '{b.method}')") from None


def check_data(d: DataConfig) -> None:
    """The data section: sizes, the source's keys, decode path and augmentation."""
    need(d.img_size >= 8, f"config key 'data.img_size' must be >= 8, got {d.img_size}")
    need(d.batch_size >= 1, f"config key 'data.batch_size' must be >= 1, got {d.batch_size}")
    need(d.workers is None or d.workers >= 0, f"config key 'data.workers' must be >= 0 (or null), got {d.workers}")
    source = get_source(d.dataset)  # an unknown name is one line listing the registered sources
    for key in ("train_samples", "val_samples"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"config key 'data.{key}' must be >= 1, got {value}")
        need(
            value is None or source.samples != "stored",
            f"config key 'data.{key}' does not apply to dataset '{d.dataset}'",
        )
    need(0.0 < d.imbalance <= 1.0, f"config key 'data.imbalance' must be in (0, 1], got {d.imbalance}")
    need(d.imbalance == 1.0 or source.imbalance, f"config key 'data.imbalance' does not apply to dataset '{d.dataset}'")
    need(
        d.rare_classes is None or len(d.rare_classes) > 0,
        "config key 'data.rare_classes' is an empty list: "
        "name the rare classes, or null for data.imbalance's exponential profile",
    )
    need(
        d.rare_classes is None or d.imbalance < 1.0,
        f"config key 'data.rare_classes' needs data.imbalance < 1 (the share the rare classes keep), got {d.imbalance}",
    )
    need(
        d.rare_classes is None or len(set(d.rare_classes)) == len(d.rare_classes),
        f"config key 'data.rare_classes' names a class twice: {d.rare_classes}",
    )
    need(d.mixup >= 0 and d.cutmix >= 0, "config keys 'data.mixup' and 'data.cutmix' must be >= 0")
    if source.needs_root:
        need(d.root is not None, f"config key 'data.root' is required for dataset '{d.dataset}'")
    need(d.shuffle_window >= 1, f"config key 'data.shuffle_window' must be >= 1, got {d.shuffle_window}")
    if d.decode not in source.decodes:
        takers = [s.name for s in sources().values() if d.decode in s.decodes]
        need(False, f"config key 'data.decode' '{d.decode}' applies to datasets {', '.join(takers)}, not '{d.dataset}'")
    if d.decode != "cpu":
        need(
            d.auto_augment is None,
            f"config key 'data.auto_augment' needs data.decode 'cpu' (the {d.decode} path crops and flips only)",
        )


def check_optim_and_runtime(o: OptimConfig, r: RuntimeConfig) -> None:
    """The optim and runtime sections' ranges."""
    need(
        o.ema_decay is None or 0 < o.ema_decay < 1, f"config key 'optim.ema_decay' must be in (0, 1), got {o.ema_decay}"
    )
    need(o.lr > 0, f"config key 'optim.lr' must be > 0, got {o.lr}")
    need(o.lr_base is None or o.lr_base > 0, f"config key 'optim.lr_base' must be > 0 (or null), got {o.lr_base}")
    need(o.accum_steps >= 1, f"config key 'optim.accum_steps' must be >= 1, got {o.accum_steps}")
    need(o.lr_base_size >= 1, f"config key 'optim.lr_base_size' must be >= 1, got {o.lr_base_size}")
    need(
        0.0 <= o.label_smoothing < 1.0, f"config key 'optim.label_smoothing' must be in [0, 1), got {o.label_smoothing}"
    )
    need(
        r.checkpoint_every is None or r.checkpoint_every >= 1,
        f"config key 'runtime.checkpoint_every' must be >= 1, got {r.checkpoint_every}",
    )
    need(r.max_nonfinite >= 1, f"config key 'runtime.max_nonfinite' must be >= 1, got {r.max_nonfinite}")
    need(
        r.log_every >= 1 and r.eval_every >= 1, "config keys 'runtime.log_every' and 'runtime.eval_every' must be >= 1"
    )


# timm schedulers that step every update (timm's create_scheduler_v2 with step_on_epochs=False).
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly")


def _choice(key: str, value: str, valid, what: str) -> UserError:
    close = difflib.get_close_matches(value, list(valid), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return UserError(f"config key '{key}': unknown {what} '{value}' ({hint}valid: {', '.join(valid)})")


def check_timm_values(cfg: Config) -> None:
    """Names handed to timm, checked before any work so that a typo is one line, not timm's traceback
    at the first step: the optimizer, the LR schedule and the augmentation policy."""
    optimizers = list_optimizers()
    name = cfg.optim.name.lower().removeprefix("lookahead_")  # timm wraps any optimizer in Lookahead this way
    if name not in optimizers:
        close = difflib.get_close_matches(name, optimizers, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise UserError(
            f"config key 'optim.name': unknown timm optimizer '{cfg.optim.name}' ({hint}"
            f"timm.optim.list_optimizers() gives all {len(optimizers)})"
        )
    if cfg.schedule.name == "plateau":
        raise UserError(
            "config key 'schedule.name': 'plateau' steps once per epoch on a validation metric; "
            f"this harness steps the LR every update: choose one of {', '.join(SCHEDULES)}"
        )
    if cfg.schedule.name not in SCHEDULES:
        raise _choice("schedule.name", cfg.schedule.name, SCHEDULES, "LR schedule")
    policy = cfg.data.auto_augment
    if policy is not None:
        try:
            create_transform(cfg.data.img_size, is_training=True, auto_augment=policy)
        except Exception as e:  # timm asserts on an unknown policy, sometimes with no message
            reason = first_line(e, otherwise="not a policy timm knows")
            raise UserError(
                f"config key 'data.auto_augment': {policy!r} is not a timm augmentation policy "
                f"({reason}); e.g. 'rand-m9-mstd0.5', 'augmix-m5', 'original', 'v0', or null"
            ) from None


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
