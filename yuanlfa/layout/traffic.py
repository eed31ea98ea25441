"""Bytes a collective sends, the one rule shared by the runtime's ``link_bytes`` records
(:mod:`yuanlfa.parallel.islands`) and the planner's link-traffic predictions.

The ring algorithm's counts: gloo and NCCL pick their own algorithms per size, but the ring's
figure is the bandwidth-optimal one that every algorithm approaches for large buffers."""

from __future__ import annotations


def ring_reduce_scatter_bytes(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring reduce-scatter (or all-gather) of an ``nbytes`` buffer
    over ``n`` ranks: n - 1 steps of nbytes / n."""
    return (n - 1) / n * nbytes if n > 1 else 0.0


def ring_all_reduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` buffer over ``n`` ranks:
    2 (n - 1) / n * nbytes (a reduce-scatter, then an all-gather)."""
    return 2 * ring_reduce_scatter_bytes(nbytes, n)
