"""Arguments every config-driven command shares."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides parsed as YAML, e.g. train.steps=20 parallel.pipeline_blocks=[2,2]",
    )
