from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 (fp64 for fp64), returned in x's dtype.

    Yuan 2.0 normalizes in fp32 even when the activations are bf16; doing the same keeps bf16
    runs close to the fp32 reference.
    """
    compute = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64 (gradcheck)
    out = F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps)
    return out.to(x.dtype)
