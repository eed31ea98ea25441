"""What fixes a layer's activation bytes besides the model config: the shape of a microbatch,
the tp layout, dtypes, kernels and recompute. Shared by the activation, component and
communication accounting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class ActivationSpec:
    """Everything besides the model config that fixes the activation bytes."""

    micro_batch: int
    seq_length: int
    tp: int = 1
    sequence_parallel: bool = False
    dtype_bytes: int = 4
    # torch's fused rms_norm kernel (CUDA) saves (input, rstd); the CPU composite also saves
    # input * rstd.
    fused_norm: bool = False
    lfa_impl: Literal["reference", "triton"] = "reference"
    recompute: Recompute = "none"
    # Under full recompute, how many layers of each stage are checkpointed: None every layer
    # (train.recompute_method uniform), else the first N (block, train.recompute_num_layers).
    recompute_layers: int | None = None

    @property
    def norm_bytes(self) -> int:
        return max(self.dtype_bytes, 4)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_length

    @property
    def shard_tokens(self) -> int:
        return self.tokens // self.tp if self.sequence_parallel else self.tokens
