"""Strict loading: YAML or a dict -> the dataclasses, with ``--set`` overrides and the
dataclasses -> plain data for manifests and logs."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from yuanlfa.config.schema import Config, ConfigError
from yuanlfa.config.validate import validate
from yuanlfa.config.yaml_strict import StrictLoader, load_yaml


def type_name(tp: Any) -> str:
    """A field type as users read it in messages and the config reference."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _coerce(value: Any, tp: Any, key: str, in_list: bool = False) -> Any:
    """Check a YAML value against the annotated type, or raise a ConfigError naming ``key``.

    Types are not converted across kinds: a string where a number is declared (or the reverse)
    is refused, since it is almost always a typo (``data.split: 8:1:1`` reaching us as a
    number, ``lr: "1e-3"`` quoted). Only lossless widening is done: an integer for a float, an
    integral float (``4e7``) for an integer. ``in_list`` allows numbers in lists of strings
    (``data.blend: [0.3, /data/a, 0.7, /data/b]``) and integers written as text inside a
    comma-separated list string (``--set parallel.pipeline_blocks=2,3,1``)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):  # list entries that are sections (cluster.groups)
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, in_list)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {_kind(value)} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
        return value
    if origin is tuple:
        (elem,) = typing.get_args(tp)[:1]
        from_text = isinstance(value, str)
        if from_text:
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_kind(value)} {value!r}")
        return tuple(
            _coerce(_number(v) if from_text else v, elem, f"{key}[{i}]", True)
            for i, v in enumerate(value)
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_kind(value)} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(
            f"{key}: expected an integer, got {_kind(value)} {value!r}{_unquote(value)}"
        )
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(
            f"{key}: expected a number, got {_kind(value)} {value!r}{_unquote(value)}"
        )
    if tp is str:
        if isinstance(value, str):
            return value
        if in_list and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(
            f"{key}: expected a string, got {_kind(value)} {value!r}; if you meant the text, "
            'quote it (e.g. "...")'
        )
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _unquote(value: Any) -> str:
    return "; drop the quotes around a number" if isinstance(value, str) else ""


def _number(text: str) -> Any:
    """An element of a comma-separated list string, typed as YAML would type it."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError:
        return text


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown key '{full}'{hint}; valid keys here: {valid}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        full = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, data[name], full)
        else:
            kwargs[name] = _coerce(data[name], tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is YAML so lists and numbers keep their types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of ``data`` with dotted overrides applied; unknown keys fail later."""
    data = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_from_dict(data: dict | None, overrides: typing.Iterable[str] = ()) -> Config:
    cfg = _from_dict(Config, apply_overrides(data or {}, overrides), "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config strictly, apply ``--set`` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; see configs/ for presets")
    data = read_yaml_file(path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(data or {}, overrides)


def read_yaml_file(path: Path) -> Any:
    """A YAML file parsed strictly (duplicate keys, YAML 1.2 scalars); one-line errors naming
    the file."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split()) or "parse error"


def config_to_dict(cfg: Any) -> dict:
    """Plain-data form (tuples as lists) for JSON manifests and logs."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [fix(x) for x in v]
        return v

    return fix(out)
