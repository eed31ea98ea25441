"""yuanlfa-train: train a model from a YAML config, alone or under torchrun."""

from __future__ import annotations

import argparse

from yuanlfa.cli.common import add_config_args, add_debug_arg, run
from yuanlfa.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-train", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-train", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from yuanlfa.train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
