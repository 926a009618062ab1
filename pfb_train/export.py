"""A run's weights as a timm model: `model.safetensors` + timm's `config.json`, as timm's `save_for_hf` writes
them, so `timm.create_model("local-dir:DIR", pretrained=True)` (or `checkpoint_path=DIR/model.safetensors`)
rebuilds the trained classifier without this package, and `push_to_hf_hub` sends the same to the Hub.

Every run writes them into its directory (`export/last`, `export/best`, `export/ema`), each as a complete
folder that replaces the previous one only once written; `pfb-train export` writes them anywhere from a
run's checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pfb_train.checkpoint import BEST, latest_checkpoint, load_checkpoint
from pfb_train.config import Config, load_config
from pfb_train.errors import UserError, first_line
from pfb_train.models import build_model

WHICH = ("best", "last", "ema")
EXPORT_DIR = "export"  # in a run directory: export/<which>/
FILES = ("model.safetensors", "config.json")  # what an export folder holds: all that write_timm_model replaces
# pretrained_cfg keys that describe timm's published weights, not these: left out of the written config.json
WEIGHTS_KEYS = (
    "tag",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "file",
    "license",
    "paper_ids",
    "paper_name",
    "notes",
    "origin_url",
)


def exportable(cfg: Config) -> Optional[str]:
    """None if timm's config.json can rebuild this run's model, else why not."""
    if cfg.model.cifar_stem:
        return "model.cifar_stem replaces the model's stem, which timm's config.json cannot describe"
    return None


def export_into_run(cfg: Config, run_dir: Path, which: str, model: nn.Module, data_config: dict) -> Optional[str]:
    """Write `model` to `run_dir`/export/`which` (write_timm_model) where the run exports (runtime.export) and
    timm's config can rebuild its model; returns why it was not written (None: written, or export off)."""
    reason = exportable(cfg)
    if cfg.runtime.export and reason is None:
        write_timm_model(model, run_dir / EXPORT_DIR / which, data_config)
    return reason if cfg.runtime.export else None


def write_timm_model(model: nn.Module, out: Path, data_config: dict) -> Path:
    """Write the timm model `model` to folder `out` as model.safetensors + config.json (timm's save_for_hf;
    `data_config`: timm's data config of the run's evaluation, into its pretrained_cfg). The
    folder is written beside `out` and swapped in once complete: a reader sees the old one or the new one.
    Returns `out`. Raises UserError where `out` is a file or a folder holding anything else (it is never
    deleted), or cannot be written."""
    from timm.models import save_for_hf  # its Hub helpers: imported when a model is written

    out = Path(out).resolve()
    if out.is_file() or (out.is_dir() and any(p.name not in FILES for p in out.iterdir())):
        raise UserError(f"{out} exists and holds other things than an export ({', '.join(FILES)}): choose a new folder")
    if not all(t.is_contiguous() for t in model.state_dict().values()):  # channels_last: safetensors wants dense
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):  # these weights are not timm's published ones: leave out what describes those
        model.__dict__["pretrained_cfg"] = {k: v for k, v in cfg.items() if k not in WEIGHTS_KEYS}  # a plain attribute
    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        save_for_hf(model, str(partial), safe_serialization=True, data_config=data_config)
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only mount
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"cannot write the timm model {out} ({reason}); the checkpoints are kept") from None
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_run(run_dir: Path, which: str, out: Path, hub: Optional[str] = None) -> Path:
    """The `which` weights (best, last or ema) of the run in `run_dir`, from its checkpoints, written to `out`
    (write_timm_model) and, with `hub`, pushed to that Hugging Face Hub repo (timm's push_to_hf_hub).
    Raises UserError (one line) for a folder without checkpoints, weights the run does not have, a model timm's
    config cannot rebuild, or a push that cannot go (offline, no credentials)."""
    if which not in WHICH:
        raise UserError(f"--which {which!r}: choose one of: {', '.join(WHICH)}")
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"))
    reason = exportable(cfg)
    if reason is not None:
        raise UserError(f"cannot export {run_dir}: {reason}")
    checkpoint = load_checkpoint(run_dir / BEST) if which == "best" else latest_checkpoint(run_dir)[1]
    if checkpoint is None and which == "best":
        raise UserError(f"{run_dir} holds no best checkpoint (runtime.save_best false, or unreadable): --which last")
    if checkpoint is None:
        raise UserError(f"{run_dir} holds no readable checkpoint to export")
    weights = checkpoint["model"]
    if which == "ema":
        if checkpoint.get("ema") is None:
            raise UserError(f"{run_dir} has no EMA weights (optim.ema_decay was not set)")
        weights = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items()}  # ModelEmaV3's copy
    num_classes = checkpoint.get("num_classes") or cfg.model.num_classes
    if num_classes is None:
        raise UserError(f"the checkpoint in {run_dir} does not say its number of classes: set model.num_classes")
    model_cfg = dataclasses.replace(cfg.model, pretrained=False)  # the run's weights replace any download
    blocked = build_model(model_cfg, cfg.blocking.stage, num_classes, img_size=cfg.data.img_size)
    blocked.load_state_dict(weights)
    data_config = checkpoint.get("data_config") or {
        "input_size": (blocked.in_chans, cfg.data.img_size, cfg.data.img_size)
    }
    written = write_timm_model(blocked.model, Path(out).expanduser(), data_config)
    if hub is not None:
        push_to_hub(blocked.model, hub, data_config)
    return written


def push_to_hub(model: nn.Module, repo: str, data_config: dict) -> None:
    """timm's push_to_hf_hub, with one line where it cannot go (HF_HUB_OFFLINE, no network, no credentials)."""
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from timm.models import push_to_hf_hub

    if HF_HUB_OFFLINE:
        raise UserError(f"cannot push to the Hugging Face Hub repo {repo!r}: HF_HUB_OFFLINE is set")
    try:
        push_to_hf_hub(model, repo, data_config=data_config)
    except Exception as e:  # network, credentials, a repo name the Hub refuses: what it said, in one line
        raise UserError(f"cannot push to the Hugging Face Hub repo {repo!r}: {first_line(e)}") from None
