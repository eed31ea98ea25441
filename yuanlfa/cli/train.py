"""yuanlfa-train: train a model from a YAML config, alone or under torchrun."""

from __future__ import annotations

import argparse
import sys

from yuanlfa.checkpoint import CheckpointError
from yuanlfa.cli.common import add_config_args
from yuanlfa.config import ConfigError, load_config
from yuanlfa.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-train", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from yuanlfa.train import train
    from yuanlfa.train.trainer import NonFiniteGradients

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, progress=not args.quiet)
    except (ConfigError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteGradients as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc} (check the paths in checkpoint.dir and logging.*)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
