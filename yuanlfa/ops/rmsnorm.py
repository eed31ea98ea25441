from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 and returned in ``x``'s dtype.

    Yuan 2.0 normalizes in fp32 even when the activations are bf16; doing the same keeps bf16
    runs close to the fp32 reference.
    """
    out = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return out.to(x.dtype)
