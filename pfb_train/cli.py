"""`pfb-train` command line: `pfb-train [train] --config X [--set key=value ...]`.

User mistakes (UserError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pfb_train.errors import Preempted, RunFinished, TrainingStopped, UserError

COMMANDS = ("train", "info", "report", "methods", "datasets", "shards", "export")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the usage block first; keep it to one line
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pfb-train",
        description="Train timm image classifiers with Partial Forward Blocking. "
        "Training is the default command: pfb-train --config CFG [--set KEY=VALUE ...] [--resume auto] "
        "(pfb-train train --help lists its options).",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train one run (the default command)")
    info = sub.add_parser("info", help="model, split point, shallow FLOP share and predicted cost of each mode")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_report_arguments(
        sub.add_parser("report", help="paper-style table (markdown, CSV) and plots from finished runs")
    )
    sub.add_parser("methods", help="the registered selection methods, their level and options with defaults")
    sub.add_parser(
        "datasets", help="the registered data sources (data.dataset), what each reads and its data.* options"
    )
    shards = sub.add_parser(
        "shards",
        help="write the config's train and validation splits as WebDataset shards (timm's layout, data.dataset: wds)",
    )
    shards.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the .tar shards and _info.json (a half-written one is finished)",
    )
    shards.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="default: 1000")
    export = sub.add_parser("export", help="a run's weights as a timm model: model.safetensors + config.json")
    export.add_argument("run", metavar="RUN_DIR", help="a run directory (its checkpoints)")
    export.add_argument("--which", default="best", choices=("best", "last", "ema"), help="default: best")
    export.add_argument("--out", required=True, metavar="DIR", help="folder for model.safetensors and config.json")
    export.add_argument("--hub", metavar="REPO", help="also push to this Hugging Face Hub repo (timm's push_to_hf_hub)")
    for p in (train, info, shards):
        p.add_argument("--config", "-c", required=True, help="YAML file, or the name of a shipped config (e.g. demo)")
        p.add_argument(
            "--set",
            "-s",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set blocking.pfb.ratio=0.3 (repeatable)",
        )
    train.add_argument(
        "--resume",
        metavar="auto|RUN_DIR|CHECKPOINT",
        help="continue a run: auto = runs/<name> if it holds a checkpoint (same as --set runtime.resume=...)",
    )
    return parser


def add_report_arguments(rep: argparse.ArgumentParser) -> None:
    """`pfb-train report`'s arguments."""
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (seeds of one setting are averaged)")
    rep.add_argument(
        "--baseline",
        action="append",
        required=True,
        metavar="RUN_DIR",
        help="full-data run(s) to compare against (repeat for several seeds)",
    )
    rep.add_argument("--out", default="report", help="folder for report.md, report.csv and the PNG plots")
    rep.add_argument(
        "--target",
        type=float,
        metavar="TOP1",
        help="top-1 (%%) whose compute to reach is tabled (default: the baseline's final top-1)",
    )
    rep.add_argument(
        "--compute",
        type=float,
        metavar="EPOCHS",
        help="compute (full-data epochs) where top-1 at equal compute is read (default: the baseline's)",
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # `pfb-train --config X` means `pfb-train train --config X`
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return {
            "train": _train,
            "info": _info,
            "report": _report,
            "methods": _methods,
            "datasets": _datasets,
            "shards": _shards,
            "export": _export,
        }[args.command](args)
    except UserError as e:
        say(f"pfb-train: error: {one_line(e)}")
        return 2
    except OSError as e:  # the machine's side: a path that cannot be made or written, a full disk
        say(f"pfb-train: error: {e}")
        return 2
    except RunFinished as e:
        print(f"pfb-train: {e}", flush=True)
        return 0
    except Preempted as e:
        say(f"pfb-train: {e}")
        return 128 + e.signum
    except TrainingStopped as e:
        say(f"pfb-train: stopped: {e}")
        return 1
    except KeyboardInterrupt:
        say("pfb-train: interrupted")
        return 130


def say(line: str) -> None:
    """One write of the whole line: the ranks of a job share stderr, and a line split in two writes
    can be cut by another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(error: Exception) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its message."""
    text = str(error)
    if "Traceback" in text:
        text = text.strip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def _train(args) -> int:
    from pfb_train.config import load_config  # per command, so the CLI starts without torch
    from pfb_train.train import run

    overrides = args.overrides + ([f"runtime.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    run(cfg)
    return 0


def _info(args) -> int:
    from pfb_train.config import load_config  # per command, so the CLI starts without torch
    from pfb_train.info import model_info

    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"model            {info['model']}  ({info['params'] / 1e6:.2f} M parameters: "
        f"shallow {info['shallow_params'] / 1e6:.2f} M, deep {info['deep_params'] / 1e6:.2f} M)"
    )
    print(f"split            after stage {info['stage']} ({info['stage_name']}) of {info['num_stages']}")
    print(
        f"forward FLOPs    {info['gflops_per_image']:.3f} GFLOPs/image at {info['img_size']} px; "
        f"shallow share {info['shallow_share']:.3f}"
    )
    print(
        f"method           {info['method']} ({info['level']} level, ratio {info['ratio']}); "
        f"blocked per {'micro-batch' if info['accum_steps'] > 1 else 'step'} {info['blocked_rows']} of "
        f"{info['batch_size']} rows"
    )
    o, batch = cfg.optim, info["batch_size"]
    if o.lr_base is None:
        lr = f"LR {o.lr:g} (optim.lr) at any global batch"
    else:
        lr = f"LR {o.lr_base:g} per {o.lr_base_size} samples: {info['lr_one_process']:g} on one process, x N on N"
    accum = info["accum_steps"]
    per_process = f"{batch} x {accum} micro-batches ({batch * accum})" if accum > 1 else f"{batch}"
    print(f"global batch     {per_process} per process x processes; {lr}")
    if info["score_scale"] == 0:
        print("ranking pass     none: the selection reads no features (recompute mode runs the kept rows alone)")
    else:
        print(f"ranking pass     recompute mode: {info['score_scale']} x resolution, {info['score_norm']} statistics")
    print("predicted cost of a blocked step, relative to full data (FLOP model, pfb_train/costs.py;")
    print("  on a GPU, blocking.mode auto times the parts instead: see the run line):")
    for mode, value in info["predicted_ratio"].items():
        marker = "  <- blocking.mode" if mode == info["mode"] else ""
        print(f"  {mode:<10} {value:.3f}{marker}")
    if "budget_epochs" in info:
        budget = f"schedule.budget {cfg.schedule.budget:g} {cfg.schedule.budget_unit}"
        if info["budget_epochs"] is None:
            print(f"budget           {budget}: the epochs it buys depend on this machine's speed")
        else:
            if info["budget_epochs_bound"]:  # a sampler-level method: its subsets depend on the training
                how = f"up to {info['budget_epochs']:.2f} epochs of {info['method']} (its smallest epochs throughout)"
            elif info["blocked_rows"]:
                how = (
                    f"{info['budget_epochs']:.2f} epochs of {info['method']} in mode {info['mode']} (windows switch "
                    "at epoch starts: about one epoch either way)"
                )
            else:
                how = f"{info['budget_epochs']:.2f} epochs of {info['method']}"
            print(f"budget           {budget} (full-data epochs of compute) buys {how}")
    return 0


def _methods(args) -> int:
    from pfb_train.selection import methods  # per command, so the CLI starts without torch

    for method in methods().values():
        print(f"{method.name} ({method.level} level): {method.summary}")
        for f in dataclasses.fields(method.options):
            print(f"    blocking.{method.name}.{f.name} = {yaml_value(f.default)}")
    return 0


def yaml_value(value) -> str:
    """A default as a config file or --set writes it: null, true, 0.4, rank (YAML's flow style)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _datasets(args) -> int:
    from pfb_train.data import sources  # per command (start-up); importing it registers the built-ins

    for source in sources().values():
        print(f"{source.name}: {source.summary}")
        keys = [
            f"data.{key}" + (" (required)" if key == "root" and source.needs_root else "") for key in source.options
        ]
        print(f"    {', '.join(keys) or 'no data.* options'}; data.decode: {' | '.join(source.decodes)}")
    return 0


def _shards(args) -> int:
    from pfb_train.config import load_config  # per command, so the CLI starts without torch
    from pfb_train.shards import write_shards

    cfg = load_config(args.config, args.overrides)
    info = write_shards(cfg.data, args.out, args.samples_per_shard, progress=cfg.runtime.progress)
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards")
    print(f"train from them with: --set data.dataset=wds --set data.root={args.out}")
    return 0


def _export(args) -> int:
    from pfb_train.export import export_run  # per command, so the CLI starts without torch

    out = export_run(args.run, args.which, args.out, hub=args.hub)
    print(f"wrote {out}/model.safetensors and config.json: timm.create_model('local-dir:{out}', pretrained=True)")
    if args.hub:
        print(f"pushed to the Hugging Face Hub: {args.hub}")
    return 0


def _report(args) -> int:
    from pfb_train.report import report  # per command, so the CLI starts without torch

    result = report(args.runs, args.baseline, args.out, args.target, args.compute)
    print(result["markdown"], end="")
    plots = ", ".join(result["plots"]) if result["plots"] else "no plots (pip install matplotlib)"
    print(f"wrote {result['out']}/report.md, report.csv; {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
