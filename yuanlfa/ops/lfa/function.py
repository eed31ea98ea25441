"""The public filter function: checks its inputs and dispatches to an implementation."""

from __future__ import annotations

import importlib.util
import os

import torch

from yuanlfa.ops.lfa.reference import LFAState, lfa_reference

IMPLS = ("auto", "reference", "triton")
ENV_VAR = "YUANLFA_LFA_IMPL"


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """Pick the implementation: ``YUANLFA_LFA_IMPL`` overrides ``impl`` ("auto" by default).

    auto: the Triton kernels on CUDA (when triton is installed), the reference elsewhere.
    triton: the kernels, which on CPU run only under ``TRITON_INTERPRET=1`` (for tests).
    """
    chosen = os.environ.get(ENV_VAR, impl) or "auto"
    if chosen not in IMPLS:
        raise ValueError(f"LFA implementation {chosen!r} is not one of {', '.join(IMPLS)}")
    if chosen == "auto":
        usable = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if usable else "reference"
    if chosen == "triton" and not _triton_usable(device):
        raise RuntimeError(
            f"lfa_impl=triton needs the triton package and a CUDA device (or TRITON_INTERPRET=1 "
            f"on CPU); got device {device.type}. Use lfa_impl=auto or reference"
        )
    return chosen


def localized_filtering(
    x: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    state: LFAState | None = None,
    doc_start: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, LFAState]:
    """LFA filter of docs/yuan2_facts.md.

    x: [s, b, h]; conv1_weight: [h/2, h, 2, 1]; conv1_bias: [h/2]; conv2_weight: [h, h/2, 2, 1];
    conv2_bias: [h]; norm_weight: [h]; state: (x [b, h], y [b, h/2]) of the token before x[0];
    doc_start: bool [s, b]. Returns (out [s, b, h], state after x[-1]).
    """
    if x.dim() != 3:
        raise ValueError(f"LFA input must be [seq, batch, hidden], got shape {tuple(x.shape)}")
    s, b, h = x.shape
    if h % 2:
        raise ValueError(f"LFA hidden size must be even, got {h}")
    expected = {
        "conv1_weight": (conv1_weight, (h // 2, h, 2, 1)),
        "conv1_bias": (conv1_bias, (h // 2,)),
        "conv2_weight": (conv2_weight, (h, h // 2, 2, 1)),
        "conv2_bias": (conv2_bias, (h,)),
        "norm_weight": (norm_weight, (h,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"LFA {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if state is not None and (
        tuple(state.x.shape) != (b, h) or tuple(state.y.shape) != (b, h // 2)
    ):
        raise ValueError(
            f"LFA state must be x [{b}, {h}] and y [{b}, {h // 2}], got "
            f"{tuple(state.x.shape)} and {tuple(state.y.shape)}"
        )
    if doc_start is not None and (
        tuple(doc_start.shape) != (s, b) or doc_start.dtype != torch.bool
    ):
        raise ValueError(
            f"LFA doc_start must be bool [{s}, {b}], got {doc_start.dtype} {tuple(doc_start.shape)}"
        )
    if resolve_impl(impl, x.device) == "triton":
        if h % 16:
            raise ValueError(
                f"the Triton LFA kernels need hidden % 16 == 0, got {h}; use lfa_impl=reference"
            )
        from yuanlfa.ops.lfa.autograd import lfa_triton

        prev_x = state.x if state is not None else None
        prev_y = state.y if state is not None else None
        out, y = lfa_triton(
            x, conv1_weight, conv1_bias, conv2_weight, conv2_bias, norm_weight, eps,
            prev_x, prev_y, doc_start,
        )  # fmt: skip
        return out, LFAState(x[-1], y[-1])
    return lfa_reference(
        x, conv1_weight, conv1_bias, conv2_weight, conv2_bias, norm_weight, eps,
        state=state, doc_start=doc_start,
    )  # fmt: skip
