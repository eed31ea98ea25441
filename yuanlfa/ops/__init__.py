"""Kernels and their plain-torch references. Nothing here imports the rest of the package."""

from yuanlfa.ops.causal_conv import causal_conv
from yuanlfa.ops.lfa import LFAState, localized_filtering
from yuanlfa.ops.rmsnorm import rms_norm
from yuanlfa.ops.rope import apply_rope, rope_cos_sin

__all__ = [
    "LFAState",
    "apply_rope",
    "causal_conv",
    "localized_filtering",
    "rms_norm",
    "rope_cos_sin",
]
