"""The source of a user's plug-in file, written by tests into a temporary directory (outside the
package) and loaded through model.plugins."""

from __future__ import annotations

from pathlib import Path

PLUGIN_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn

from yuanlfa import register_attention, register_filter


@register_filter("test_gated_taps")
class GatedTaps(nn.Module):
    """out = x + sigmoid(down(silu(up(x)))) * (per-channel 4-tap causal filter of x)."""

    receptive_field = 3
    tp_plan = {"up": "column", "down": "row"}

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.taps = nn.Parameter(torch.randn(4, h) * 0.5)
        self.up = nn.Linear(h, 2 * h)
        self.down = nn.Linear(2 * h, h, bias=True)

    def forward(self, x, doc_start=None):
        out = x * self.taps[-1]
        for j in range(1, min(4, x.shape[0])):
            out = out + F.pad(x[:-j] * self.taps[-1 - j], (0, 0, 0, 0, j, 0))
        return x + torch.sigmoid(self.down(F.silu(self.up(x)))) * out


@register_filter("test_taps")
class Taps(nn.Module):
    """A replicated 3-tap causal filter (sequence parallelism gives it a 2-token halo)."""

    receptive_field = 2

    def __init__(self, cfg):
        super().__init__()
        self.taps = nn.Parameter(torch.randn(3, cfg.hidden_size) * 0.5)

    def forward(self, x, doc_start=None):
        out = x * self.taps[-1]
        for j in range(1, min(3, x.shape[0])):
            out = out + F.pad(x[:-j] * self.taps[-1 - j], (0, 0, 0, 0, j, 0))
        return x + out


@register_filter("test_running_mean")
class RunningMean(nn.Module):
    """x + w * (mean of x_0..x_t): reads the whole sequence (receptive_field None)."""

    receptive_field = None

    def __init__(self, cfg):
        super().__init__()
        self.w = nn.Parameter(torch.rand(cfg.hidden_size) + 0.5)

    def forward(self, x, doc_start=None):
        steps = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device)
        return x + self.w * x.cumsum(0) / steps[:, None, None]


@register_attention("test_scaled")
class ScaledAttention(nn.Module):
    """Causal attention with a learned per-head query scale (split over tp with the heads) and
    a shared temperature (replicated)."""

    tp_plan = {"head_scale": "split:0"}

    def __init__(self, cfg):
        super().__init__()
        self.head_scale = nn.Parameter(torch.rand(cfg.num_heads) + 0.5)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, q, k, v, doc_start=None):
        q = q * (self.head_scale[:, None] * self.temperature)
        qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        past = k.shape[0] - q.shape[0]
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return out.permute(2, 0, 1, 3)
'''


_WRITTEN: list[str] = []


def write_plugin(directory: Path, name: str = "my_filters.py") -> str:
    """Write the plug-in file once per test session and return its path: the registry refuses a
    second file registering the same names in one process (spawned ranks load it afresh)."""
    if not _WRITTEN:
        path = Path(directory) / name
        path.write_text(PLUGIN_SOURCE)
        _WRITTEN.append(str(path))
    return _WRITTEN[0]
