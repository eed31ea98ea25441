"""Plain-torch reference of the LFA filter (docs/yuan2_facts.md).

    y_t   = A0 x_{t-1} + A1 x_t + a          (h -> h/2, x_{-1} = 0)
    z_t   = B0 y_{t-1} + B1 y_t + b          (h/2 -> h, y_{-1} = 0)
    out_t = RMSNorm(z_t + x_t)

Weights keep the PyTorch Conv2d form of the released model ([out, in, 2, 1], kernel index 0
multiplies the previous token) so checkpoints convert without reshaping. Each convolution is a GEMM
over [x_{t-1} | x_t]: the previous-token product is computed on the unshifted input and added to
the next row of the output, so no padded or concatenated copy of the input is made.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from yuanlfa.ops.rmsnorm import rms_norm


class LFAState(NamedTuple):
    """What the filter needs to continue a sequence: the last input and last conv1 output."""

    x: torch.Tensor  # [b, h]
    y: torch.Tensor  # [b, h/2]


def _causal_conv2(
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prev: torch.Tensor | None,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """out_t = W0 inp_{t-1} + W1 inp_t + bias for inp: [s, b, c_in], weight: [c_out, c_in, 2, 1].

    ``prev`` ([b, c_in]) stands for inp_{-1}; ``keep`` ([s, b, 1]) zeroes the previous-token term
    where a document starts.
    """
    w_prev, w_cur = weight[:, :, 0, 0], weight[:, :, 1, 0]
    out = F.linear(inp, w_cur, bias)
    from_prev = F.linear(inp[:-1], w_prev)  # [s-1, b, c_out], lands on rows 1..s-1
    if keep is not None:
        from_prev = from_prev * keep[1:]
    out[1:] += from_prev
    if prev is not None:
        first = F.linear(prev, w_prev)
        if keep is not None:
            first = first * keep[0]
        out[0] += first
    return out


def lfa_reference(
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
) -> tuple[torch.Tensor, LFAState]:
    """Apply the filter to x: [s, b, h]; return (out [s, b, h], state after the last token).

    state: the previous tokens' (x, y) for continuing a sequence (decoding, or a later chunk);
    None means the sequence starts here. doc_start: optional bool [s, b], True where a document
    starts; the filter then ignores everything before that token.
    """
    keep = None
    if doc_start is not None:
        keep = (~doc_start).unsqueeze(-1).to(x.dtype)
    prev_x = state.x if state is not None else None
    prev_y = state.y if state is not None else None
    y = _causal_conv2(x, conv1_weight, conv1_bias, prev_x, keep)  # [s, b, h/2]
    z = _causal_conv2(y, conv2_weight, conv2_bias, prev_y, keep)  # [s, b, h]
    out = rms_norm(z + x, norm_weight, eps)
    return out, LFAState(x[-1], y[-1])


def halo_state(
    halo: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    halo_doc_start: torch.Tensor | None = None,
) -> LFAState:
    """The state entering a sequence shard, from the previous shard's last two inputs.

    halo: [2, b, h] = (x_{s0-2}, x_{s0-1}). y_{s0-1} needs both, which is why sequence
    parallelism exchanges two tokens. halo_doc_start: optional bool [b], True where x_{s0-1}
    starts a document (then x_{s0-2} does not reach it). Differentiable: the halo's gradient
    flows back through this function to be returned to the previous rank.
    """
    if halo.dim() != 3 or halo.shape[0] != 2:
        raise ValueError(f"LFA halo must be [2, batch, hidden], got {tuple(halo.shape)}")
    w_prev, w_cur = conv1_weight[:, :, 0, 0], conv1_weight[:, :, 1, 0]
    from_prev = F.linear(halo[0], w_prev)
    if halo_doc_start is not None:
        from_prev = from_prev * (~halo_doc_start).unsqueeze(-1).to(halo.dtype)
    y_last = F.linear(halo[1], w_cur, conv1_bias) + from_prev
    return LFAState(halo[1], y_last)
