"""Closed-form parameter counts of the Yuan 2.0 model (checked against the model in the tests)."""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # the (tied) embedding matrix
    per_layer: int
    # Of per_layer: the weights tensor parallelism shards (projections) and the ones it
    # replicates (norms, and the LFA filter without sequence parallelism).
    per_layer_sharded: int
    per_layer_replicated: int
    lfa_per_layer: int
    final_norm: int
    head: int  # a separate output matrix when embeddings are untied, else 0
    num_layers: int

    @property
    def total(self) -> int:
        layers = self.num_layers * self.per_layer
        return self.embedding + layers + self.final_norm + self.head

    @property
    def lfa_share(self) -> float:
        """LFA's fraction of the whole model's parameters."""
        return self.num_layers * self.lfa_per_layer / self.total


def param_counts(cfg: ModelConfig) -> ParamCounts:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved to count parameters")
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    attention = 2 * h * h + h * h + h * h  # fused qk, v, o
    mlp = 2 * f * h + f * h  # fc1 ([SiLU; linear]) and fc2
    lfa = 0
    if cfg.lfa:
        half = h // 2
        lfa = (half * h * 2 + half) + (h * half * 2 + h) + h  # conv1, conv2, norm
    norms = 2 * h
    return ParamCounts(
        embedding=v * h,
        per_layer=attention + mlp + lfa + norms,
        per_layer_sharded=attention + mlp,
        per_layer_replicated=lfa + norms,
        lfa_per_layer=lfa,
        final_norm=h,
        head=0 if cfg.tie_embeddings else v * h,
        num_layers=cfg.num_layers,
    )
