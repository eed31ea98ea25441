"""The library's own filters and core attention, registered like plug-ins.

Filters (``model.filter``), the variants of the paper's attention ablation (Yuan 2.0, Table 1):

- ``lfa``: two causal convolutions of kernel 2 (h -> h/2 -> h), residual, RMSNorm (the default,
  docs/yuan2_facts.md);
- ``lfa_no_norm``: the same convolutions and residual without the RMSNorm;
- ``conv``: one causal convolution h -> h of ``model.filter_kernel`` taps, residual, RMSNorm;
- ``none``: no filter (Q and K read the normed input, as in plain attention).

Core attention (``model.attention``): ``causal``, softmax attention with a causal (or, with
``model.document_attention``, per-document) mask; ``model.attention_backend`` picks the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.attention import causal_attention
from yuanlfa.model.dropout import LayerDropout
from yuanlfa.model.lfa import LocalizedFiltering, conv_parameters, init_conv_stack
from yuanlfa.model.registry import register_builtin
from yuanlfa.ops.causal_conv import causal_conv
from yuanlfa.ops.rmsnorm import rms_norm

register_builtin("filter", "lfa")(LocalizedFiltering)


@register_builtin("filter", "lfa_no_norm")
class LocalizedFilteringNoNorm(nn.Module):
    """LFA without its output RMSNorm: out_t = z_t + x_t. Parameters as LFA's, minus the norm."""

    receptive_field = 2

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        half = hidden_size // 2
        self.conv1 = conv_parameters(half, hidden_size, 2)
        self.conv2 = conv_parameters(hidden_size, half, 2)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> LocalizedFilteringNoNorm:
        return cls(cfg.hidden_size)

    @classmethod
    def init_parameter(
        cls, name: str, shape: tuple[int, ...], cfg: ModelConfig, generator: torch.Generator
    ) -> torch.Tensor:
        return init_conv_stack(name, shape, cfg, generator)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """x: [s, b, h] -> [s, b, h]."""
        y = causal_conv(x, self.conv1.weight, self.conv1.bias, doc_start=doc_start)
        return causal_conv(y, self.conv2.weight, self.conv2.bias, doc_start=doc_start) + x


@register_builtin("filter", "conv")
class ConvFilter(nn.Module):
    """One causal convolution of ``kernel`` taps, h -> h, then LFA's residual and RMSNorm:
    out_t = RMSNorm(sum_j W_j x_{t-j} + bias + x_t)."""

    receptive_field = 1  # per instance: kernel - 1

    def __init__(self, hidden_size: int, kernel: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv = conv_parameters(hidden_size, hidden_size, kernel)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.receptive_field = kernel - 1

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ConvFilter:
        return cls(cfg.hidden_size, cfg.filter_kernel, cfg.norm_eps)

    @classmethod
    def init_parameter(
        cls, name: str, shape: tuple[int, ...], cfg: ModelConfig, generator: torch.Generator
    ) -> torch.Tensor:
        if name == "norm.weight":
            return torch.ones(shape)
        return init_conv_stack(name, shape, cfg, generator)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """x: [s, b, h] -> [s, b, h]."""
        z = causal_conv(x, self.conv.weight, self.conv.bias, doc_start=doc_start)
        return rms_norm(z + x, self.norm.weight, self.eps)


@register_builtin("attention", "causal")
class CausalAttention(nn.Module):
    """Softmax attention, causal within the sequence (or within each document)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> CausalAttention:
        return cls(cfg.attention_backend)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dropout: LayerDropout | None = None,
    ) -> torch.Tensor:
        """q: [s, b, heads, d]; k, v: [past + s, b, heads, d] -> [s, b, heads, d]."""
        return causal_attention(q, k, v, self.backend, doc_start, dropout)
