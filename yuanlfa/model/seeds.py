"""Seeds derived from names: a parameter's initial value depends only on (seed, its global
name), whatever the layout or the process that draws it."""

from __future__ import annotations

import hashlib


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
