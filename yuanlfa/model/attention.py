"""The LFA attention block: V from x, [Q|K] from the filtered x, RoPE, causal attention."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.cache import LayerCache
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.ops.rope import apply_rope

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _use_flash(q: torch.Tensor, backend: str) -> bool:
    usable = _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not usable:
        raise RuntimeError(
            "model.attention_backend=flash needs the flash-attn package, a CUDA device and "
            "bf16/fp16 activations; use attention_backend=auto"
        )
    return usable and backend in ("auto", "flash")


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention where the queries are the last ``s`` of the ``past + s`` keys.

    q: [s, b, heads, d]; k, v: [past + s, b, heads, d]. Returns [s, b, heads, d].
    """
    s, kv = q.shape[0], k.shape[0]
    past = kv - s
    if _use_flash(q, backend):
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom-right, which is what a cache needs.
        out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True)
        return out.transpose(0, 1)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, len, d]
    if backend == "math":
        ctx = torch.nn.attention.SDPBackend.MATH
        with torch.nn.attention.sdpa_kernel(ctx):
            out = _sdpa(qb, kb, vb, s, past)
    else:
        out = _sdpa(qb, kb, vb, s, past)
    return out.permute(2, 0, 1, 3)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int, past: int) -> torch.Tensor:
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if s == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal aligns a non-square mask to the top-left; build the bottom-right one.
    rows = torch.arange(s, device=q.device).unsqueeze(1) + past
    mask = torch.arange(past + s, device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LFAAttention(nn.Module):
    """Yuan 2.0 attention. ``qk_proj`` is the fused per-head projection: its output viewed as
    [.., heads, 2 * head_dim] holds [q_head; k_head] for each head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.backend = cfg.attention_backend
        self.lf_gate = LocalizedFiltering(h, cfg.norm_eps, cfg.lfa_impl) if cfg.lfa else None
        self.qk_proj = nn.Linear(h, 2 * h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention alone (a method so selective recompute can wrap just this)."""
        return causal_attention(q, k, v, self.backend)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [s, b, h] (the normed layer input); cos/sin: [s, b, 1, head_dim]."""
        v = self.v_proj(x)
        # The projections define the sequence length: a sequence-parallel plan feeds this block
        # a shard of x and projections that gather the full sequence.
        s, b = v.shape[:2]
        v = v.view(s, b, self.num_heads, self.head_dim)
        filtered = x
        if self.lf_gate is not None:
            state = cache.lfa if cache is not None else None
            filtered, new_state = self.lf_gate(x, state=state, doc_start=doc_start)
            if cache is not None:
                cache.lfa = new_state
        qk = self.qk_proj(filtered).view(s, b, self.num_heads, 2 * self.head_dim)
        q, k = qk.split(self.head_dim, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        out = self.core_attention(q, k, v)  # [s, b, heads, d]
        return self.o_proj(out.reshape(s, b, self.num_heads * self.head_dim))
