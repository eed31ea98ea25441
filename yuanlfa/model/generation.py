"""Incremental decoding with the per-layer cache, and a small sampling loop."""

from __future__ import annotations

import torch

from yuanlfa.model.cache import InferenceCache
from yuanlfa.model.transformer import YuanModel


@torch.no_grad()
def generate(
    model: YuanModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eod_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend input_ids [b, s] by up to ``max_new_tokens``; greedy when temperature == 0.

    The prompt is processed once (prefill), then each new token costs one step over the cache.
    Sequences that produced ``eod_id`` keep emitting it. Returns [b, s + new].
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty [batch, seq], got {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = InferenceCache()
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[:, -1].float()  # [b, vocab]
        if temperature > 0:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        if eod_id is not None:
            token = torch.where(done, torch.full_like(token, eod_id), token)
            done |= token == eod_id
        out = torch.cat((out, token.unsqueeze(1)), dim=1)
        step_input = token.unsqueeze(1)
        if eod_id is not None and bool(done.all()):
            break
    return out
