"""One-off: rewrite run directories written by earlier versions of pfb-train in today's keys, in place.

What changed, and what each stored file gets:
- config.yaml: the flat `blocking:` keys of earlier versions (`ratio`, `centers`, `ema`, ...) move into the
  section of every method that reads them (`blocking.pfb.ratio`, `blocking.infobatch.prune_ratio`, ...);
  a `blocking.pfb` section gets the options added since written as the run behaved then (`stratify: none`:
  one ranking over the batch; `score_scale: 1.0` / `score_norm: batch`: the exact ranking pass;
  `density: marginal`; `class_memory: 256.0`, unused without `percentile`);
- summary.json: `ratio_option`, the option that says how much the method drops.
Files already in today's keys are left as they are. pfb-train reads only today's keys: a config or
checkpoint of an earlier version gets one line naming what changed.

    python scripts/upgrade_run_logs.py docs/results      # every run directory below a folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pfb_train.config import MOVED_FLAT_KEYS as MOVED  # flat key of earlier versions -> {method: its option now}

# options added to pfb after runs were written, as those runs behaved
PFB_THEN = {"stratify": "none", "score_scale": 1.0, "score_norm": "batch", "density": "marginal", "class_memory": 256.0}
RATIO_OPTION = {"pfb": "ratio", "random": "ratio", "infobatch": "prune_ratio", "static_random": "drop_fraction"}
PLAIN = ("method", "stage", "mode")


def upgrade_blocking(blocking: dict) -> dict:
    """A stored `blocking:` section in today's form (flat keys into sections; pfb's later options as then)."""
    out = {k: v for k, v in blocking.items() if k in PLAIN or isinstance(v, dict)}
    for key, value in blocking.items():
        if key in PLAIN or isinstance(value, dict):
            continue
        if key not in MOVED:
            raise SystemExit(f"unknown flat blocking key {key!r}")
        for method, option in MOVED[key].items():
            section = out.setdefault(method, {})
            section.setdefault(option, value)  # a section's own value wins, as it did
    if isinstance(out.get("pfb"), dict) or out.get("method") == "pfb":
        out["pfb"] = {**PFB_THEN, **(out.get("pfb") or {})}
    return out


def upgrade_run(run_dir: Path) -> bool:
    """Rewrite one run directory's config.yaml and summary.json; returns whether anything changed."""
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_path.read_text())
    blocking = upgrade_blocking(config.get("blocking") or {})
    changed = blocking != config.get("blocking")
    if changed:
        config["blocking"] = blocking
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if "ratio_option" not in summary:
            summary["ratio_option"] = RATIO_OPTION.get(summary["method"])
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            changed = True
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder: every run directory (a config.yaml) below it")
    args = parser.parse_args()
    runs = sorted(p.parent for p in args.root.rglob("config.yaml"))
    changed = sum(upgrade_run(run) for run in runs)
    print(json.dumps({"run_dirs": len(runs), "rewritten": changed}))


if __name__ == "__main__":
    main()
