"""The YAML dialect of configs: YAML 1.2's core scalars and no duplicate keys.

PyYAML reads YAML 1.1, where ``8:1:1`` is the base-60 integer 28861, ``1:30`` is 90, ``on`` /
``no`` are booleans and ``1e-3`` is a string; a mapping that names a key twice silently keeps the
last value. Configs are typed by their dataclasses, so a scalar is resolved only as YAML 1.2's
core schema does (true/false, null, decimal / 0x / 0o integers, decimal floats with optional
exponent, .inf, .nan) and everything else stays a string for the schema to accept or refuse.
A key given twice, at any level, is an error naming the key and both lines.
"""

from __future__ import annotations

import io
import re
from typing import Any

import yaml

from yuanlfa.config.schema import ConfigError

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution).
_CORE = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", [*"~nN", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    (
        "tag:yaml.org,2002:int",
        r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$",
        list("-+0123456789"),
    ),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars and duplicate keys refused."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, Any]]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                name = key_node.start_mark.name
                where = "" if name.startswith("<") else f"{name}: "
                raise ConfigError(
                    f"{where}key {key!r} is given twice (lines {first} and {line}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text.startswith("0o"):
            return int(text[2:], 8)
        return int(text, 0) if text.startswith("0x") else int(text)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node)).lower()
        if text.endswith("inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        return float("nan") if text == ".nan" else float(text)


for _tag, _regexp, _first in _CORE:
    StrictLoader.add_implicit_resolver(_tag, re.compile(_regexp), _first)
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)


def load_yaml(text: str, name: str | None = None) -> Any:
    """``text`` parsed strictly; ``name`` (a file name) prefixes the position of errors."""
    return yaml.load(_named(text, name), Loader=StrictLoader)


def _named(text: str, name: str | None) -> Any:
    if name is None:
        return text
    stream = io.StringIO(text)
    stream.name = name  # PyYAML names marks after the stream
    return stream
