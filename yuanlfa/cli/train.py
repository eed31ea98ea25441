"""yuanlfa-train: train a model from a YAML config, alone or under torchrun."""

from __future__ import annotations

import argparse
import os

from yuanlfa.cli.common import (
    add_cluster_arg,
    add_config_args,
    add_debug_arg,
    run,
    with_cluster_file,
)
from yuanlfa.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-train", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--island",
        type=int,
        metavar="I",
        help="this launch is island I of parallel.islands, joined to the others through "
        "torchft (one torchrun per island; also YUANLFA_ISLAND; docs/islands.md)",
    )
    add_cluster_arg(parser, "the devices each pipeline rank plans and runs with (docs/planning.md)")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-train", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from yuanlfa.train import train

    if args.island is not None:
        # The library reads the island from the environment, as torchrun's ranks.
        os.environ["YUANLFA_ISLAND"] = str(args.island)
    # train() checks output paths, input files and kernels before any data is read.
    cfg = with_cluster_file(load_config(args.config, args.overrides), args.cluster)
    train(cfg, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
