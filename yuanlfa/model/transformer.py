"""The single-device Yuan 2.0 model. No process groups here: parallelism is applied from outside.

Layers live in a ModuleDict keyed by their GLOBAL index, and the embedding and head are optional,
so a pipeline stage is this same class holding a subset with unchanged parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.attention import LFAAttention
from yuanlfa.model.cache import InferenceCache
from yuanlfa.model.dropout import DropoutKey, microbatch_key
from yuanlfa.model.norm import RMSNorm
from yuanlfa.ops.cross_entropy import blockwise_lm_loss
from yuanlfa.ops.rope import rope_cos_sin


class SwiGLU(nn.Module):
    """fc1's rows are [SiLU branch; linear branch] (Yuan's dense_h_to_4h): fc2(silu(a) * g)."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * g)


class LMHead(nn.Module):
    """Logits, or per-token losses, from the final hidden states. Holds no parameters: the (tied)
    output matrix is passed in, so a tensor-parallel plan can swap this module for a
    vocab-parallel one without renaming anything. Losses use the block-wise cross entropy, so
    full fp32 logits are never materialized."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """hidden: [s, b, h]; weight: [vocab, h]; labels: [s, b] -> losses [s, b] or logits."""
        if labels is None:
            return F.linear(hidden, weight)  # [s, b, vocab]
        return blockwise_lm_loss(hidden, weight, labels, block_size=self.block_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = LFAAttention(cfg)
        self.attn.layer_id = layer_id
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        dropout: DropoutKey | None = None,
    ) -> torch.Tensor:
        layer_cache = cache.layer(self.layer_id) if cache is not None else None
        x = x + self.attn(self.input_norm(x), cos, sin, doc_start, layer_cache, dropout)
        return x + self.mlp(self.post_attn_norm(x))


def _embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """``nn.Embedding(vocab_size, hidden_size)``, with its own init (N(0, 1)) drawn only for real
    tensors. Models are built on the meta device first (every process that saves, loads or
    converts a checkpoint does), and ``normal_`` of a meta tensor goes through torch's reference
    implementation, whose first call imports ``torch._dynamo``: 1.1 s of a 2B conversion.
    Parameters get their values from :func:`~yuanlfa.model.init.materialize` either way."""
    weight = torch.empty(vocab_size, hidden_size)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(vocab_size, hidden_size, _weight=weight)


class YuanModel(nn.Module):
    """Decoder-only LM. ``input_ids``/``position_ids``/``labels`` are [b, s] as users pass them;
    inside, activations are [s, b, h] (sequence first, so sequence sharding is a dim-0 split)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_ids: Iterable[int] | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
    ) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved before building the model")
        self.cfg = cfg
        ids = range(cfg.num_layers) if layer_ids is None else list(layer_ids)
        for i in ids:
            if not 0 <= i < cfg.num_layers:
                raise ValueError(f"layer id {i} outside [0, {cfg.num_layers})")
        self.has_embedding = has_embedding
        self.has_head = has_head
        # The tied head reads the embedding matrix, so a head-only stage holds it too.
        needs_embed = has_embedding or (has_head and cfg.tie_embeddings)
        self.embed = _embedding(cfg.vocab_size, cfg.hidden_size) if needs_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in ids})
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if has_head else None
        self.output = None
        if has_head and not cfg.tie_embeddings:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head = LMHead(cfg.loss_block_size) if has_head else None

    def head_weight(self) -> torch.Tensor:
        return self.output.weight if self.output is not None else self.embed.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        """Run the held layers.

        input_ids: [b, s] on a stage with the embedding, else hidden: [s, b, h].
        position_ids: [b, s]; default 0..s-1 (offset by the cache length when decoding).
        Returns, on a stage with the head, per-token fp32 losses [b, s] when labels ([b, s]) are
        given, else logits [b, s, vocab]; on other stages the hidden states [s, b, h].
        """
        if self.has_embedding:
            if input_ids is None:
                raise ValueError("this stage holds the embedding: pass input_ids")
            hidden = self.embed_tokens(input_ids)
        elif hidden is None:
            raise ValueError("this stage has no embedding: pass hidden [s, b, h]")
        hidden = self.run_layers(hidden, position_ids, self.layers.keys(), cache)
        if not self.has_head:
            return hidden
        return self.head_forward(hidden, labels)

    # The pieces below let a pipeline stage run a subset of this model's layers (see
    # yuanlfa.parallel.pp.stage) with the same code as the whole model.

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> hidden [s, b, h]."""
        return self.embed(input_ids.t())

    def run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None,
        layer_ids: Iterable[str],
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        """Run the layers named by ``layer_ids`` (keys of ``self.layers``) in order."""
        s, b, _ = hidden.shape  # s is the local shard under sequence parallelism
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=hidden.device).expand(b, s)
        pos = position_ids.t()  # [s, b]
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_base, hidden.dtype)
        document_aware = self.cfg.lfa_reset_at_doc_start or self.cfg.document_attention
        doc_start = (pos == 0) if document_aware else None
        layer_ids = list(layer_ids)
        dropout = None
        if self.training and self.cfg.attention_dropout > 0 and layer_ids:
            # One key per microbatch and stage (named by its first layer), read here once and
            # passed down as an argument, so recomputed layers see their own microbatch's key.
            dropout = microbatch_key(self.cfg.attention_dropout, layer_ids[0], b)
        for key in layer_ids:
            hidden = self.layers[key](hidden, cos, sin, doc_start, cache, dropout)
        if cache is not None:
            cache.length += s
        return hidden

    def head_forward(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Final norm and head: per-token losses [b, s] given labels [b, s], else logits."""
        hidden = self.final_norm(hidden)
        out = self.lm_head(hidden, self.head_weight(), labels.t() if labels is not None else None)
        return out.transpose(0, 1)
