"""The LFA filter as a module, usable in any PyTorch model (the functional form is
:func:`yuanlfa.ops.localized_filtering`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.ops.lfa import LFAState, localized_filtering


def conv_parameters(out_channels: int, in_channels: int, kernel: int) -> nn.Module:
    """A holder of ``weight`` [out, in, kernel, 1] and ``bias`` [out] (the Conv2d names and shapes
    of the released model), left uninitialized."""
    conv = nn.Module()
    conv.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, 1))
    conv.bias = nn.Parameter(torch.empty(out_channels))
    return conv


def init_conv_stack(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, generator: torch.Generator
) -> torch.Tensor:
    """torch.nn.Conv2d's default init (what the released model was trained from) for the filter
    convolutions ``conv.*``, ``conv1.*``, ``conv2.*``: U(+-1/sqrt(fan_in)), fan_in = in channels
    * taps (a bias uses its weight's)."""
    if name.endswith(".weight"):
        fan_in = shape[1] * shape[2]
    else:
        taps = cfg.filter_kernel if name.startswith("conv.") else 2
        fan_in = (cfg.hidden_size // 2 if name.startswith("conv2.") else cfg.hidden_size) * taps
    bound = 1.0 / math.sqrt(fan_in)
    out = torch.empty(shape, dtype=torch.float32)
    return out.uniform_(-bound, bound, generator=generator)


class LocalizedFiltering(nn.Module):
    """The LFA filter of docs/yuan2_facts.md (registered as ``lfa``, the default ``model.filter``).

    Input x [s, b, h] (sequence first), output [s, b, h]:
    ``y_t = A0 x_{t-1} + A1 x_t + a``, ``z_t = B0 y_{t-1} + B1 y_t + b``,
    ``out_t = RMSNorm(z_t + x_t)``. Parameter names and shapes follow the released model:
    ``conv1.weight`` [h/2, h, 2, 1], ``conv1.bias`` [h/2], ``conv2.weight`` [h, h/2, 2, 1],
    ``conv2.bias`` [h], ``norm.weight`` [h]. A new module draws torch.nn.Conv2d's default
    init (norm weight ones) from the global generator, as torch's own layers do.

    ``forward(x, state=None, doc_start=None)`` returns ``(out, state)``: pass the state back in
    to continue a sequence chunk by chunk (decoding). ``impl``: "auto" (Triton kernels on CUDA),
    "reference" or "triton".
    """

    # Output t reads x_{t-2..t}: sequence-parallel shards exchange a 2-token halo.
    receptive_field = 2

    def __init__(self, hidden_size: int, eps: float = 1e-6, impl: str = "auto") -> None:
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"LFA hidden size must be even, got {hidden_size}")
        self.hidden_size = hidden_size
        half = hidden_size // 2
        self.conv1 = conv_parameters(half, hidden_size, 2)
        self.conv2 = conv_parameters(hidden_size, half, 2)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.impl = impl
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> LocalizedFiltering:
        return cls(cfg.hidden_size, cfg.norm_eps, cfg.lfa_impl)

    @classmethod
    def init_parameter(
        cls, name: str, shape: tuple[int, ...], cfg: ModelConfig, generator: torch.Generator
    ) -> torch.Tensor:
        """The layout-independent initial value of parameter ``name`` (see model.init)."""
        if name == "norm.weight":
            return torch.ones(shape, dtype=torch.float32)
        return init_conv_stack(name, shape, cfg, generator)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.norm.weight.is_meta:
            return  # built to be materialized later (yuanlfa.model.init)
        h = self.hidden_size
        for conv, fan_in in ((self.conv1, 2 * h), (self.conv2, h)):
            bound = 1.0 / math.sqrt(fan_in)
            conv.weight.uniform_(-bound, bound)
            conv.bias.uniform_(-bound, bound)
        self.norm.weight.fill_(1.0)

    def forward(
        self,
        x: torch.Tensor,
        state: LFAState | None = None,
        doc_start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LFAState]:
        """x: [s, b, h]; state: (x [b, h], y [b, h/2]) of the token before x[0], or None at a
        sequence start; doc_start: optional bool [s, b], True where a document starts (the
        filter then restarts there). Returns (filtered [s, b, h], state after x[-1])."""
        return localized_filtering(
            x,
            self.conv1.weight,
            self.conv1.bias,
            self.conv2.weight,
            self.conv2.bias,
            self.norm.weight,
            self.eps,
            state=state,
            doc_start=doc_start,
            impl=self.impl,
        )
