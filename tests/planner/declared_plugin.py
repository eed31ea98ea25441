"""A user's plug-in file that declares its costs for the planner (register_*(..., cost=...)),
written by tests into a temporary directory and loaded through model.plugins."""

from __future__ import annotations

from pathlib import Path

PLUGIN_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn

from yuanlfa import register_attention, register_filter
from yuanlfa.planner import ComponentCost


def taps_cost(cfg):
    h = cfg.hidden_size

    def saved(spec):
        # x and its shifted views are the layer's normed input; under sequence parallelism the
        # shard with its 2-token halo is a new tensor, kept by the products.
        if not spec.sequence_parallel:
            return 0
        return spec.dtype_bytes * h * (spec.shard_tokens + 2 * spec.micro_batch)

    return ComponentCost(params=3 * h, forward_flops=2.0 * 3 * h, saved_bytes=saved, halo_tokens=2)


@register_filter("test_declared_taps", cost=taps_cost)
class DeclaredTaps(nn.Module):
    """A replicated 3-tap causal filter."""

    receptive_field = 2

    def __init__(self, cfg):
        super().__init__()
        self.taps = nn.Parameter(torch.randn(3, cfg.hidden_size) * 0.5)

    def forward(self, x, doc_start=None):
        out = x * self.taps[-1]
        for j in range(1, min(3, x.shape[0])):
            out = out + F.pad(x[:-j] * self.taps[-1 - j], (0, 0, 0, 0, j, 0))
        return x + out


def gate_cost(cfg):
    h = cfg.hidden_size

    def saved(spec):
        a, T, Tq, tp = spec.dtype_bytes, spec.tokens, spec.shard_tokens, spec.tp
        total = 4 * a * (h // tp) * T  # up's output and silu's, [.., 2h / tp] each
        total += 2 * a * h * Tq  # the sigmoid's output and x * w
        if spec.sequence_parallel:
            total += a * h * T + a * h * Tq  # up's gathered input; the shard x (for x * w)
        return total

    return ComponentCost(
        params=(2 * h * h + 2 * h) + (2 * h * h + h) + h,
        sharded_params=(2 * h * h + 2 * h) + 2 * h * h,
        forward_flops=2.0 * 4 * h * h,
        saved_bytes=saved,
        column_inputs=1.0,
        row_outputs=1.0,
    )


class DeclaredGate(nn.Module):
    """x + sigmoid(down(silu(up(x)))) * (x * w), pointwise; up and down shard over tp."""

    receptive_field = 0
    tp_plan = {"up": "column", "down": "row"}
    cost = staticmethod(gate_cost)  # declared as an attribute instead of cost=

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.up = nn.Linear(h, 2 * h)
        self.down = nn.Linear(2 * h, h)
        self.w = nn.Parameter(torch.rand(h) + 0.5)

    def forward(self, x, doc_start=None):
        return x + torch.sigmoid(self.down(F.silu(self.up(x)))) * (x * self.w)


register_filter("test_declared_gate")(DeclaredGate)


def scaled_cost(cfg):
    h, heads = cfg.hidden_size, cfg.num_heads

    def saved(spec):
        tp, T = spec.tp, spec.tokens
        # q (for the scale's gradient), the scaled q, k, v and the softmax log-sum-exp.
        return 4 * spec.dtype_bytes * (h // tp) * T + 4 * (heads // tp) * T

    return ComponentCost(
        params=heads + 1,
        sharded_params=heads,
        forward_flops=0.0,
        context_flops=4.0 * h,
        saved_bytes=saved,
    )


@register_attention("test_declared_scaled", cost=scaled_cost)
class DeclaredScaled(nn.Module):
    """Causal attention with a learned per-head query scale and a shared temperature."""

    tp_plan = {"head_scale": "split:0"}

    def __init__(self, cfg):
        super().__init__()
        self.head_scale = nn.Parameter(torch.rand(cfg.num_heads) + 0.5)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, q, k, v, doc_start=None):
        q = q * (self.head_scale[:, None] * self.temperature)
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        return out.permute(2, 0, 1, 3)
'''


_WRITTEN: list[str] = []


def write_declared_plugin(directory: Path) -> str:
    """Write the file once per test session and return its path (the registry refuses a second
    file registering the same names in one process; spawned ranks load it afresh)."""
    if not _WRITTEN:
        path = Path(directory) / "declared_costs.py"
        path.write_text(PLUGIN_SOURCE)
        _WRITTEN.append(str(path))
    return _WRITTEN[0]
