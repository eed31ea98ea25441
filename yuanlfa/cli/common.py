"""What every command shares: the config arguments, and how a failure reaches the user.

A command's work runs through :func:`run`: an expected failure (a bad config, checkpoint, data
file or path) becomes one line on stderr, ``PROG: what is wrong (the file or field); what to
do``, and exit status 2; anything else is a bug, reported in one line with exit status 1 and a
pointer to ``--debug``. ``--debug`` or ``YUANLFA_DEBUG=1`` shows the traceback instead. This
module stays torch-free (yuanlfa-plan runs without torch): the library's error types are
recognised by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

from yuanlfa.config import ClusterConfig, Config, ConfigError, config_from_dict
from yuanlfa.config.load import read_yaml_file

# The library's user-facing error types (each message names the culprit and the fix), by
# class name so that this module imports neither torch nor the packages defining them.
EXPECTED = ("ConfigError", "CheckpointError", "DataError", "NonFiniteGradients")
EXIT_EXPECTED = 2
EXIT_BUG = 1
# A run that diverged is not a bad input: its own status, as before.
EXIT_CODES = {"NonFiniteGradients": 1}


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


def add_cluster_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--cluster",
        metavar="FILE",
        help="a heterogeneous cluster (YAML: cluster.groups of device, nodes, devices_per_node; "
        f"inter_gbps) in place of the config's cluster section: {what}",
    )


def _read_cluster(path: str) -> ClusterConfig:
    """A cluster file: YAML holding a ``cluster:`` mapping, or the mapping itself."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--cluster: {path!r} not found; give a YAML file with cluster.groups")
    data = read_yaml_file(file)
    if not isinstance(data, dict):
        raise ConfigError(f"--cluster: {path} must hold a mapping with groups")
    return config_from_dict({"cluster": data.get("cluster", data)}).cluster


def with_cluster_file(cfg: Config, path: str | None) -> Config:
    """``cfg`` with the cluster of ``--cluster FILE`` in place of its own section (if given)."""
    if path is None:
        return cfg
    return dataclasses.replace(cfg, cluster=_read_cluster(path))


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a failure (also YUANLFA_DEBUG=1)",
    )


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    env = os.environ.get("YUANLFA_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def run(prog: str, body: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    """``body()``'s exit status, or a failure turned into one line on stderr."""
    try:
        return body()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug_requested(args):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if debug_requested(args):
            raise
        cause = unwrap(exc)
        line = " ".join(message(cause).split())  # one line, whatever the library said
        if expected(cause):
            print(f"{prog}: {line}", file=sys.stderr)
            return EXIT_CODES.get(type(cause).__name__, EXIT_EXPECTED)
        print(
            f"{prog}: internal error: {type(cause).__name__}: {line}. This is a bug; rerun with "
            "--debug (or YUANLFA_DEBUG=1) for the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_BUG


def unwrap(exc: BaseException) -> BaseException:
    """The error behind torch.distributed.checkpoint's ``CheckpointException`` (which collects
    the failures of every rank as ``{rank: (exception, traceback)}``), the first rank's."""
    seen = 0
    while seen < 8 and isinstance(getattr(exc, "failures", None), dict) and exc.failures:
        first = next(iter(exc.failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if not isinstance(inner, BaseException):
            break
        exc, seen = inner, seen + 1
    return exc


def expected(exc: BaseException) -> bool:
    if isinstance(exc, (ConfigError, OSError)):
        return True
    return any(cls.__name__ in EXPECTED for cls in type(exc).__mro__)


def message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        # "[Errno 13] Permission denied: 'x'" -> "x: permission denied"
        name = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{name}: {(exc.strerror or str(exc)).lower()}"
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return text or type(exc).__name__
