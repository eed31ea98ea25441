"""Closed-form parameter counts of the Yuan 2.0 model: the fixed parts of each layer plus what its
filter and core attention declare (:mod:`.components`); checked against the model in the tests."""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import ModelConfig
from yuanlfa.planner.components import component_cost


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # the (tied) embedding matrix
    per_layer: int
    # Of per_layer: the weights tensor parallelism shards (projections, and what the filter and
    # core attention declare sharded) and the ones it replicates (norms, the built-in filters).
    per_layer_sharded: int
    per_layer_replicated: int
    lfa_per_layer: int  # the filter's (whichever model.filter is; 0 for none)
    attention_per_layer: int  # the core attention's own (0 for the built-in softmax attention)
    final_norm: int
    head: int  # a separate output matrix when embeddings are untied, else 0
    num_layers: int

    @property
    def total(self) -> int:
        layers = self.num_layers * self.per_layer
        return self.embedding + layers + self.final_norm + self.head

    @property
    def lfa_share(self) -> float:
        """The filter's fraction of the whole model's parameters."""
        return self.num_layers * self.lfa_per_layer / self.total


def param_counts(cfg: ModelConfig) -> ParamCounts:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved to count parameters")
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    projections = 2 * h * h + h * h + h * h  # fused qk, v, o
    mlp = 2 * f * h + f * h  # fc1 ([SiLU; linear]) and fc2
    norms = 2 * h
    filt = component_cost("filter", cfg)
    core = component_cost("attention", cfg)
    parts = [c for c in (filt, core) if c is not None]
    sharded = projections + mlp + sum(c.sharded_params for c in parts)
    replicated = norms + sum(c.replicated_params for c in parts)
    return ParamCounts(
        embedding=v * h,
        per_layer=sharded + replicated,
        per_layer_sharded=sharded,
        per_layer_replicated=replicated,
        lfa_per_layer=filt.params if filt is not None else 0,
        attention_per_layer=core.params if core is not None else 0,
        final_norm=h,
        head=0 if cfg.tie_embeddings else v * h,
        num_layers=cfg.num_layers,
    )
