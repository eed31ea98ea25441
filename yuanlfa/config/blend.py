"""The syntax of ``data.blend`` (Megatron's ``--data-path`` form), checked when a config is
loaded; the datasets it names are built by :mod:`yuanlfa.data.blended`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from yuanlfa.config.schema import ConfigError

_PAIRS_HINT = "give pairs like '0.3 /data/a 0.7 /data/b', or a single prefix"


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(items: Sequence[str] | str) -> list[tuple[float, str]]:
    """(weight, prefix) pairs from Megatron's ``--data-path`` form: alternating weight and
    .bin/.idx prefix, or one prefix alone (weight 1). A string is split on whitespace.

    Weights are kept as given (not normalized). Raises :class:`ConfigError` ("data.blend: ...")
    for a malformed list; whether the files exist is the caller's check.
    """
    items = items.split() if isinstance(items, str) else [str(item) for item in items]
    if not items:
        raise ConfigError(f"data.blend: no datasets; {_PAIRS_HINT}")
    if len(items) == 1:
        if not items[0]:
            raise ConfigError(f"data.blend: the prefix is empty; {_PAIRS_HINT}")
        if _weight(items[0]) is not None:
            raise ConfigError(
                f"data.blend: {items[0]!r} is a weight with no prefix after it; {_PAIRS_HINT} "
                f"(write ./{items[0]} for a prefix that reads as a number)"
            )
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ConfigError(
            f"data.blend: {len(items)} items, an odd number, so not weight and prefix pairs; "
            f"{_PAIRS_HINT}"
        )
    pairs: list[tuple[float, str]] = []
    seen: dict[str, int] = {}
    n = len(items)
    for k in range(0, n, 2):
        text, prefix = items[k], items[k + 1]
        weight = _weight(text)
        if weight is None:
            raise ConfigError(
                f"data.blend: item {k + 1} of {n} ({text!r}) should be a weight: each prefix "
                f"needs one before it; {_PAIRS_HINT}"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(
                f"data.blend: weight {text} (item {k + 1} of {n}) must be a finite number > 0; "
                "leave a dataset out rather than give it weight 0"
            )
        if not prefix:
            raise ConfigError(f"data.blend: item {k + 2} of {n} is an empty prefix; {_PAIRS_HINT}")
        if _weight(prefix) is not None:
            raise ConfigError(
                f"data.blend: item {k + 2} of {n} ({prefix!r}) should be the prefix after weight "
                f"{text}; {_PAIRS_HINT} (write ./{prefix} for a prefix that reads as a number)"
            )
        key = os.path.normpath(prefix)  # a/b and a//b/ name the same files
        if key in seen:
            raise ConfigError(
                f"data.blend: prefix {prefix} is given twice (items {seen[key]} and {k + 2} of "
                f"{n}); give it once with the sum of its weights"
            )
        seen[key] = k + 2
        pairs.append((weight, prefix))
    return pairs
