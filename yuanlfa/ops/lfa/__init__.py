"""Localized Filtering-based Attention's filter: reference, dispatch and (later) Triton kernels."""

from yuanlfa.ops.lfa.function import localized_filtering, resolve_impl
from yuanlfa.ops.lfa.reference import LFAState, halo_state, lfa_reference

__all__ = ["LFAState", "halo_state", "lfa_reference", "localized_filtering", "resolve_impl"]
