from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for per-token positions.

    position_ids: [s, b] (any integer dtype). Returns cos, sin: [s, b, 1, head_dim], broadcast over
    heads. Angles are computed in fp32 (fp64 for fp64) from the positions themselves, so
    positions that restart at document boundaries rotate exactly like the start of a sequence.
    """
    device = position_ids.device
    compute = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=device, dtype=compute) / head_dim)
    )
    angles = position_ids.to(compute).unsqueeze(-1) * inv_freq  # [s, b, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # [s, b, 1, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [s, b, heads, head_dim] (the rotate-half convention used by Yuan 2.0).

    The result keeps x's dtype (bf16 q/k under autocast stay bf16, so flash-attn can run).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
