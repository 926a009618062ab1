"""`pfb-train` command line: `pfb-train [train] --config X [--set key=value ...]`.

User mistakes (UserError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from pfb_train.errors import UserError

COMMANDS = ("train",)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the usage block first; keep it to one line
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pfb-train", description="Train timm image classifiers with Partial Forward Blocking.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train one run (the default command)")
    train.add_argument("--config", "-c", required=True, help="YAML file, or the name of a shipped config (e.g. demo)")
    train.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set blocking.ratio=0.3 (repeatable)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")  # `pfb-train --config X` means `pfb-train train --config X`
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return _train(args)
    except UserError as e:
        print(f"pfb-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pfb-train: interrupted", file=sys.stderr)
        return 130


def _train(args) -> int:
    from pfb_train.config import load_config
    from pfb_train.train import run

    cfg = load_config(args.config, args.overrides)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
