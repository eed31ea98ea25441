"""Per-layer state for incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from yuanlfa.ops.lfa import LFAState


@dataclass
class LayerCache:
    k: torch.Tensor | None = None  # [past, b, heads, head_dim], after RoPE
    v: torch.Tensor | None = None  # [past, b, heads, head_dim]
    lfa: LFAState | None = None  # the LFA filter's x_{t-1} and y_{t-1}
    # Other filters: their last receptive_field inputs [r, b, h] (and document starts [r, b]).
    filter_inputs: torch.Tensor | None = None
    filter_starts: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=0)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=0)
        return self.k, self.v


@dataclass
class InferenceCache:
    """Everything needed to continue a batch of sequences: one LayerCache per global layer."""

    layers: dict[int, LayerCache] = field(default_factory=dict)
    length: int = 0

    def layer(self, layer_id: int) -> LayerCache:
        return self.layers.setdefault(layer_id, LayerCache())
