"""Checks of what a config names outside itself, run before any data is read or model built.

:func:`validate` checks a config against itself; these check it against the machine: every
output path can be written (a ``checkpoint.dir`` that is a file, or a ``logging.jsonl`` under a
read-only directory, would otherwise fail at the first save or log line, after the work), every
input file named exists, and the chosen kernels are installed. Torch-free: the caller says
whether CUDA is there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from yuanlfa.config.blend import parse_blend
from yuanlfa.config.schema import Config, ConfigError


def preflight(cfg: Config, cuda: bool | None) -> None:
    """All of this module's checks; ``cuda`` as for :func:`check_backends`."""
    check_outputs(cfg)
    check_inputs(cfg)
    check_backends(cfg, cuda)


def check_outputs(cfg: Config) -> None:
    """Every path the run writes can be created or written: directories are directories (or
    can be made), files are not directories and their directory is writable."""
    c, lg, d = cfg.checkpoint, cfg.logging, cfg.data
    for field, path in (
        ("checkpoint.dir", c.dir),
        ("logging.tensorboard_dir", lg.tensorboard_dir),
        ("data.cache_dir", d.cache_dir),
    ):
        if path is not None:
            _writable_dir(field, Path(path))
    if lg.jsonl is not None:
        path = Path(lg.jsonl)
        if path.is_dir():
            raise ConfigError(f"logging.jsonl: {path} is a directory; give a file name")
        if path.exists():
            _require_access(path, "logging.jsonl", "file")
        else:
            _writable_dir("logging.jsonl", path.parent, creating=path)


def check_inputs(cfg: Config) -> None:
    """Every file the config names as an input is there (the tokenizer is checked by validate,
    plug-in files by the model registry)."""
    d, c = cfg.data, cfg.checkpoint
    prefixes = [("data.path", d.path)] if d.path is not None else []
    if d.blend:
        prefixes += [("data.blend", prefix) for _, prefix in parse_blend(d.blend)]
    for field, prefix in prefixes:
        missing = [prefix + s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            raise ConfigError(
                f"{field}: {' and '.join(missing)} not found; give the prefix yuanlfa-preprocess "
                "wrote (PATH for PATH.bin and PATH.idx)"
            )
    if c.init_from is not None and not Path(c.init_from).exists():
        raise ConfigError(
            f"checkpoint.init_from: {c.init_from} not found; give a step directory or a "
            "checkpoint.dir of our format (yuanlfa-reshard --to yuanlfa imports others)"
        )


def check_backends(cfg: Config, cuda: bool | None) -> None:
    """The kernels the config asks for by name can run here. ``cuda``: whether a CUDA device is
    usable (torch.cuda.is_available()), or None where the caller does not run the model (only
    what does not depend on the device is checked)."""
    m, t = cfg.model, cfg.train
    if m.attention_backend == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attention_backend: flash needs the flash-attn package (pip install "
                "flash-attn); use auto to take it when it is there"
            )
        if t.device == "cpu" or t.precision == "fp32":
            raise ConfigError(
                f"model.attention_backend: flash runs on CUDA in bf16, but train.device is "
                f"{t.device} and train.precision {t.precision}; use auto, or train on a GPU in bf16"
            )
        if cuda is False:
            raise ConfigError(
                "model.attention_backend: flash needs a CUDA device and none is usable here; use "
                "auto (sdpa on this machine)"
            )
    if t.device == "cuda" and cuda is False:
        raise ConfigError("train.device: cuda, but no CUDA device is usable here; use auto or cpu")


def _writable_dir(field: str, path: Path, creating: Path | None = None) -> None:
    """``path`` is a writable directory, or can be created as one (its nearest existing
    ancestor is a writable directory). ``creating``: the file to be made in it, for messages."""
    what = creating if creating is not None else path
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() and probe == what:
        raise ConfigError(f"{field}: {path} is a file; give a directory (created when missing)")
    if not probe.is_dir():
        raise ConfigError(f"{field}: {what} cannot be created, {probe} is a file")
    _require_access(probe, field, "directory", what)


def _require_access(path: Path, field: str, kind: str, what: Path | None = None) -> None:
    mode = os.W_OK | (os.X_OK if kind == "directory" else 0)
    if not os.access(path, mode):
        target = "" if what is None or what == path else f" to create {what}"
        raise ConfigError(
            f"{field}: the {kind} {path} is not writable{target}; choose a path you can write"
        )
