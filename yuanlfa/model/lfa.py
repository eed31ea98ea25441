from __future__ import annotations

import torch
from torch import nn

from yuanlfa.ops.lfa import LFAState, localized_filtering


class LocalizedFiltering(nn.Module):
    """The LFA filter as a module. Parameter names and shapes follow the released model
    (``conv1.weight`` [h/2, h, 2, 1], ``conv2.weight`` [h, h/2, 2, 1], ``norm.weight`` [h])."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, impl: str = "auto") -> None:
        super().__init__()
        half = hidden_size // 2
        self.conv1 = nn.Module()
        self.conv1.weight = nn.Parameter(torch.empty(half, hidden_size, 2, 1))
        self.conv1.bias = nn.Parameter(torch.empty(half))
        self.conv2 = nn.Module()
        self.conv2.weight = nn.Parameter(torch.empty(hidden_size, half, 2, 1))
        self.conv2.bias = nn.Parameter(torch.empty(hidden_size))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.impl = impl

    def forward(
        self,
        x: torch.Tensor,
        state: LFAState | None = None,
        doc_start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LFAState]:
        """x: [s, b, h] -> (filtered [s, b, h], state after the last token)."""
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
