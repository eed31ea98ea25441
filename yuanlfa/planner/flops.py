"""FLOPs per token of the Yuan 2.0 model, by term (2 FLOPs per multiply-add): the fixed parts
of each layer plus what its filter and core attention declare (:mod:`.components`)."""

from __future__ import annotations

from yuanlfa.config import ModelConfig
from yuanlfa.planner.components import component_cost


def flops_per_token(cfg: ModelConfig, seq_length: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token by component, plus the training total (forward + 2x backward).

    The attention term grows with the sequence: QK^T and AV cost 2 * 2 * s * h per token per
    layer, of which a causal mask needs half on average (``causal``; Megatron counts it whole).
    The ``lfa`` term is the filter's, whichever ``model.filter`` is (0 for none). A cost a
    plug-in leaves undeclared counts as 0 (see components.unknown_costs).
    """
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved to count FLOPs")
    h, f, L, v = cfg.hidden_size, cfg.ffn_size, cfg.num_layers, cfg.vocab_size
    filt = component_cost("filter", cfg)
    core = component_cost("attention", cfg)
    context = seq_length * (0.5 if causal else 1.0)
    attention = core.context_flops * context + (core.forward_flops or 0.0)
    terms = {
        "projections": L * 2.0 * (4 * h * h),
        "lfa": L * (filt.forward_flops or 0.0) if filt is not None else 0.0,
        "mlp": L * 2.0 * (3 * f * h),
        "attention": L * attention,
        "head": 2.0 * h * v,
    }
    forward = sum(terms.values())
    return {**terms, "forward": forward, "train": 3.0 * forward}
