"""FLOPs per token of the Yuan 2.0 model, by term (2 FLOPs per multiply-add)."""

from __future__ import annotations

from yuanlfa.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_length: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token by component, plus the training total (forward + 2x backward).

    The attention term grows with the sequence: QK^T and AV cost 2 * 2 * s * h per token per
    layer, of which a causal mask needs half on average (``causal``; Megatron counts it whole).
    """
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved to count FLOPs")
    h, f, L, v = cfg.hidden_size, cfg.ffn_size, cfg.num_layers, cfg.vocab_size
    attention_scores = 4.0 * seq_length * h * (0.5 if causal else 1.0)
    terms = {
        "projections": L * 2.0 * (4 * h * h),
        "lfa": L * 2.0 * (2 * h * h) if cfg.lfa else 0.0,  # two GEMMs with K = 2h and 2(h/2)
        "mlp": L * 2.0 * (3 * f * h),
        "attention": L * attention_scores,
        "head": 2.0 * h * v,
    }
    forward = sum(terms.values())
    return {**terms, "forward": forward, "train": 3.0 * forward}
