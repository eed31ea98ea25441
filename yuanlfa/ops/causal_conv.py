"""A causal convolution along the sequence of any kernel size: the plain-torch building block of
the filter variants of the paper's ablation (one convolution of kernel k; LFA without its norm).

Weights keep the PyTorch Conv2d form of the released LFA ([c_out, c_in, k, 1]): kernel index
k-1 multiplies the current token, index k-1-j the token j steps back. Each tap is one GEMM on
the unpadded input, added to the rows it lands on, so no padded copy of the input is made (the
same scheme as the LFA reference, whose kernel-2 results this reproduces exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """out_t = sum_j W[:, :, k-1-j] x_{t-j} + bias, for j < k and x before the sequence zero.

    x: [s, b, c_in]; weight: [c_out, c_in, k, 1]; bias: [c_out] or None; doc_start: optional
    bool [s, b], True where a document starts (a tap then never reads across that start).
    Returns [s, b, c_out].
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv input must be [seq, batch, channels], got {tuple(x.shape)}")
    s, b, c_in = x.shape
    if weight.dim() != 4 or weight.shape[1] != c_in or weight.shape[3] != 1:
        raise ValueError(
            f"causal_conv weight must be [c_out, {c_in}, kernel, 1], got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"causal_conv bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if doc_start is not None and (
        tuple(doc_start.shape) != (s, b) or doc_start.dtype != torch.bool
    ):
        raise ValueError(
            f"causal_conv doc_start must be bool [{s}, {b}], got {doc_start.dtype} "
            f"{tuple(doc_start.shape)}"
        )
    k = weight.shape[2]
    out = F.linear(x, weight[:, :, k - 1, 0], bias)
    segment = torch.cumsum(doc_start.long(), dim=0) if doc_start is not None else None  # [s, b]
    for j in range(1, min(k, s)):
        back = F.linear(x[:-j], weight[:, :, k - 1 - j, 0])  # lands on rows j..s-1
        if segment is not None:
            # Keep the tap only where the token j steps back is in the same document.
            same = (segment[j:] == segment[:-j]).unsqueeze(-1).to(x.dtype)
            back = back * same
        out[j:] += back
    return out
