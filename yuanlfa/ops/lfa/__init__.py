"""Localized Filtering-based Attention's filter: plain-torch reference, Triton kernels, dispatch."""

from yuanlfa.ops.lfa.function import localized_filtering, resolve_impl
from yuanlfa.ops.lfa.reference import LFAState, halo_state, lfa_reference

__all__ = ["LFAState", "halo_state", "lfa_reference", "localized_filtering", "resolve_impl"]
