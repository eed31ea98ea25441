"""Calibrating the cost model on measurements: a sustained FLOP/s, a per-message latency and the
host-side throughput of collectives.

The model has machine constants a datasheet does not give: the FLOP/s a device sustains on this
model (peak * mfu is a guess), the per-message latency of the links as the collective library
sees them (software, not wire: on a busy CPU host gloo needs a fraction of a millisecond to
milliseconds per message) and, on a host, the collective library's own work per byte (copies and
sums on the cores that also run the model: :class:`~.links.Link` ``cpu_gbps``). Each is either
measured directly (the latency: a small ping-pong across the link) or fitted so that the model
reproduces one measured step time; every other prediction then comes from the model alone. A
latency fitted on a step made of large collectives absorbs their per-byte host work and is then
wrong for every small message: measure it, and fit the per-byte work separately.

- :func:`flops_from_layer_time`: the rate implied by a timed layer forward (or any timed part
  whose FLOPs :mod:`.flops` counts).
- :func:`fit_flops_per_s` / :func:`fit_latency_s` / :func:`fit_cpu_gbps`: the constant that makes
  ``predict`` return a measured step time. ``predict`` is monotonic in the constant (step time
  falls with FLOP/s and the host's throughput, grows with latency), so a bisection finds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from yuanlfa.config import ConfigError, ModelConfig
from yuanlfa.planner.flops import flops_per_token

# Payload share of a shaped TCP link's rate: a 1500-byte MTU frame (+ 14 bytes of Ethernet
# header, which a qdisc counts) carries 1448 bytes of payload (IP 20 + TCP 20 + timestamps 12).
TCP_PAYLOAD_EFFICIENCY = 1448 / 1514


def flops_from_layer_time(
    model: ModelConfig, seq_length: int, tokens: int, seconds: float, tp: int = 1
) -> float:
    """Sustained FLOP/s implied by one decoder layer's forward over ``tokens`` tokens taking
    ``seconds`` (tp shards the projections, MLP and attention; the LFA stays whole)."""
    if seconds <= 0 or tokens <= 0:
        raise ConfigError(f"layer timing: need seconds > 0 and tokens > 0, got {seconds}, {tokens}")
    terms = flops_per_token(model, seq_length)
    per_token = (terms["projections"] + terms["mlp"] + terms["attention"]) / tp + terms["lfa"]
    return per_token / model.num_layers * tokens / seconds


def _bisect(
    f: Callable[[float], float], target: float, lo: float, hi: float, increasing: bool, log: bool
) -> float:
    """x in [lo, hi] with f(x) = target for a monotonic f (clamped to the ends)."""
    f_lo, f_hi = f(lo), f(hi)
    if increasing and target <= f_lo or not increasing and target >= f_lo:
        return lo
    if increasing and target >= f_hi or not increasing and target <= f_hi:
        return hi
    for _ in range(200):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        above = f(mid) > target
        if above == increasing:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * max(abs(hi), 1e-30):
            break
    return math.sqrt(lo * hi) if log else (lo + hi) / 2


def fit_flops_per_s(
    predict: Callable[[float], float], measured_s: float, lo: float = 1e6, hi: float = 1e18
) -> float:
    """The sustained FLOP/s with ``predict(flops_per_s) == measured_s``."""
    if measured_s <= 0:
        raise ConfigError(f"measured step time must be > 0, got {measured_s}")
    return _bisect(predict, measured_s, lo, hi, increasing=False, log=True)


def fit_latency_s(predict: Callable[[float], float], measured_s: float, hi: float = 1.0) -> float:
    """The per-message latency with ``predict(latency_s) == measured_s`` (0 when even no
    latency predicts more than measured)."""
    if measured_s <= 0:
        raise ConfigError(f"measured step time must be > 0, got {measured_s}")
    return _bisect(predict, measured_s, 0.0, hi, increasing=True, log=False)


def fit_cpu_gbps(
    predict: Callable[[float], float], measured_s: float, lo: float = 1e-4, hi: float = 1e4
) -> float:
    """The collectives' host-side throughput (GB/s) with ``predict(cpu_gbps) == measured_s``
    (``hi``, i.e. practically free, when even that predicts more than measured)."""
    if measured_s <= 0:
        raise ConfigError(f"measured step time must be > 0, got {measured_s}")
    return _bisect(predict, measured_s, lo, hi, increasing=False, log=True)
