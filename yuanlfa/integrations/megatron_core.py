"""LFA inside megatron-core's GPT model: a layer spec, its self-attention, and state-dict
conversion to and from yuanlfa's names. Optional: ``pip install "yuanlfa[megatron]"``.

megatron-core's ``SelfAttention`` fuses Q, K and V in one ``linear_qkv``; Yuan 2.0 computes V from
the normed input and a fused per-head [q; k] projection from the LFA-filtered input
(docs/yuan2_facts.md 2). :class:`LFASelfAttention` is a megatron-core ``Attention`` with those
submodules::

    from megatron.core.models.gpt import GPTModel
    from yuanlfa.integrations.megatron_core import get_lfa_gpt_block_spec, transformer_config

    config = transformer_config(yuan_model_config, tensor_model_parallel_size=2)
    model = GPTModel(config=config, transformer_layer_spec=get_lfa_gpt_block_spec(config),
                     vocab_size=..., max_sequence_length=..., position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)

``megatron_core_to_yuanlfa(state_dicts, cfg)`` turns that model's state dict (one, or one per
tensor-parallel rank) into yuanlfa's full parameters, ready for ``YuanModel.load_state_dict`` or
a checkpoint; ``yuanlfa_to_megatron_core`` goes back.

On CPU, megatron-core 0.16 runs this layer and the decoder block (gloo, world size 1) when the
core attention is :class:`SDPACoreAttention` (its own ``DotProductAttention`` and
``RotaryEmbedding`` allocate on CUDA); ``GPTModel.forward`` needs CUDA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "yuanlfa.integrations.megatron_core needs megatron-core: pip install 'yuanlfa[megatron]' "
        f"({exc})"
    ) from exc

from yuanlfa.config import ModelConfig
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.ops.rmsnorm import rms_norm
from yuanlfa.parallel.tp.layers import SequenceParallelLFA
from yuanlfa.parallel.tp.plan import shard_pieces


class RMSNorm(nn.Module):
    """RMSNorm with megatron-core's norm constructor. Unlike megatron-core's torch fallback it
    works under sequence parallelism (its weight is tagged ``sequence_parallel``, so
    megatron-core all-reduces its gradient over tensor-parallel ranks), on CPU and GPU."""

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs: Any
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LFAGate(LocalizedFiltering):
    """LocalizedFiltering built the way megatron-core builds submodules; returns the tensor.

    With ``config`` it is placed and initialized like megatron-core's own layers: on the current
    CUDA device unless ``use_cpu_initialization``, in ``params_dtype``, conv weights drawn by
    ``init_method`` (when ``perform_initialization``), biases zero, the norm weight one."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        impl: str = "auto",
        config: TransformerConfig | None = None,
    ) -> None:
        super().__init__(hidden_size, eps, impl)
        if config is None:
            return
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.to(device=device, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                for conv in (self.conv1, self.conv2):
                    config.init_method(conv.weight)
                    conv.bias.zero_()
                self.norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """x: [s, b, h] -> filtered [s, b, h]."""
        return super().forward(x)[0]


class _SequenceParallelGate(nn.Module):
    """The gate on this rank's sequence shard with its 2-token halo (yuanlfa's scheme);
    parameter names unchanged (lf_gate.conv1.weight, ...)."""

    def __init__(self, gate: LocalizedFiltering, group) -> None:
        super().__init__()
        self.inner = [SequenceParallelLFA(gate, group)]  # not registered: the params are below
        self.conv1, self.conv2, self.norm = gate.conv1, gate.conv2, gate.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner[0](x)[0]


@dataclass
class LFASelfAttentionSubmodules:
    """Submodules of :class:`LFASelfAttention` (megatron-core's spec style)."""

    linear_qk: ModuleSpec | type = None
    linear_v: ModuleSpec | type = None
    lf_gate: ModuleSpec | type = None
    core_attention: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None


class LFASelfAttention(Attention):
    """Yuan 2.0 self-attention for megatron-core: V = linear_v(x), [q|k] per head =
    linear_qk(lf_gate(x)), then megatron-core's RoPE, core attention and linear_proj.

    linear_qk's output rows are laid out per head as [q_head; k_head], so a column-parallel split
    keeps whole heads. Under sequence parallelism the gate filters this rank's shard with a
    2-token halo; its parameters are replicated and tagged ``sequence_parallel`` so megatron-core
    all-reduces their gradients over tensor-parallel ranks (as for its layer norms).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: LFASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        if config.num_query_groups != config.num_attention_heads:
            raise ValueError(
                "LFASelfAttention: Yuan 2.0 has no grouped-query attention; set num_query_groups "
                f"= num_attention_heads ({config.num_attention_heads}), got "
                f"{config.num_query_groups}"
            )
        common = dict(
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_group=self.pg_collection.tp,
        )
        hidden = config.hidden_size
        self.linear_qk = build_module(
            submodules.linear_qk, hidden, 2 * self.query_projection_size,
            tp_comm_buffer_name="qk", **common,
        )  # fmt: skip
        self.linear_v = build_module(
            submodules.linear_v, hidden, self.kv_projection_size, tp_comm_buffer_name="v",
            **common,
        )  # fmt: skip
        gate = build_module(submodules.lf_gate, hidden, eps=config.layernorm_epsilon, config=config)
        for p in gate.parameters():
            p.sequence_parallel = config.sequence_parallel
        if config.sequence_parallel and self.world_size > 1:
            gate = _SequenceParallelGate(gate, self.pg_collection.tp)
        self.lf_gate = gate
        # Attention.forward reads these (no q/k norms in Yuan 2.0).
        self.q_layernorm = None
        self.k_layernorm = None

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [s, b, h] (a sequence shard under sequence parallelism) -> q, k, v
        [s, b, heads/tp, head_dim]."""
        if output_gate or not split_qkv:
            raise NotImplementedError(
                "LFASelfAttention supports neither attention_output_gate nor fused_single_qkv_rope"
            )
        value, _ = self.linear_v(hidden_states)
        qk, _ = self.linear_qk(self.lf_gate(hidden_states))
        heads, d = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        s, b = qk.shape[:2]
        query, key = qk.view(s, b, heads, 2 * d).split(d, dim=-1)
        return query.contiguous(), key.contiguous(), value.view(s, b, heads, d)


class SDPACoreAttention(nn.Module):
    """megatron-core's core-attention interface on torch's scaled_dot_product_attention: causal
    softmax(q k^T / sqrt(d)) v. Runs on CPU and GPU (megatron-core's own local
    DotProductAttention allocates a CUDA buffer); no dropout, no packed sequences."""

    def __init__(self, config: TransformerConfig, layer_number: int, **kwargs: Any) -> None:
        super().__init__()
        self.config = config
        self.softmax_scale = kwargs.get("softmax_scale")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query/key/value [s, b, heads, d] -> [s, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences or attention bias")
        s, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scale = self.softmax_scale if self.softmax_scale is not None else 1 / math.sqrt(d)
        if attention_mask is not None and attn_mask_type != AttnMaskType.causal:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def get_lfa_layer_spec(
    core_attention: ModuleSpec | type | None = None,
    column_parallel_linear: type | None = None,
    row_parallel_linear: type | None = None,
    norm: ModuleSpec | type | None = None,
) -> ModuleSpec:
    """A megatron-core TransformerLayer spec with LFA attention (pre-norm RMSNorm layers; the
    MLP is megatron-core's, SwiGLU with ``gated_linear_unit=True``, ``activation_func=silu``).

    core_attention: default megatron-core's local DotProductAttention (pass Transformer Engine's
    for speed, or :class:`SDPACoreAttention` to run on CPU). The linears default to
    megatron-core's tensor-parallel ones, the norms to :class:`RMSNorm` (or e.g. TENorm).
    """
    backend = LocalSpecProvider()
    column = column_parallel_linear or ColumnParallelLinear
    row = row_parallel_linear or RowParallelLinear
    norm = norm or RMSNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=LFASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=LFASelfAttentionSubmodules(
                    linear_qk=column,
                    linear_v=column,
                    lf_gate=LFAGate,
                    core_attention=core_attention or backend.core_attention(),
                    linear_proj=row,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_lfa_gpt_block_spec(
    config: TransformerConfig,
    core_attention: ModuleSpec | type | None = None,
    norm: ModuleSpec | type | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage (pass as GPTModel's transformer_layer_spec):
    LFA layers and a final norm of the same kind (a bare layer spec would get megatron-core's
    default final norm, which without Transformer Engine or apex refuses sequence
    parallelism)."""
    layer = get_lfa_layer_spec(core_attention, norm=norm)
    if config.pipeline_model_parallel_size == 1 and vp_stage is None:
        layers = config.num_layers  # also before megatron-core's process groups exist
    else:
        layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=norm or RMSNorm)


get_lfa_gpt_layer_spec = get_lfa_layer_spec


def transformer_config(cfg: ModelConfig, **overrides: Any) -> TransformerConfig:
    """megatron-core's TransformerConfig for a Yuan 2.0 model: RMSNorm, SwiGLU of
    ``cfg.ffn_size``, no biases, no dropout, our init std. ``overrides`` go to TransformerConfig
    (parallel sizes, dtypes, ``use_cpu_initialization``, ...)."""
    if cfg.filter_name != "lfa" or cfg.attention != "causal":
        raise ValueError(
            f"megatron-core integration: only the default LFA model (filter lfa, attention "
            f"causal), got filter {cfg.filter_name!r}, attention {cfg.attention!r}"
        )
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# megatron-core name (after "decoder.layers.{i}.") -> ours (after "layers.{i}.")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qk.weight": "attn.qk_proj.weight",
    "self_attention.linear_v.weight": "attn.v_proj.weight",
    "self_attention.lf_gate.conv1.weight": "attn.lf_gate.conv1.weight",
    "self_attention.lf_gate.conv1.bias": "attn.lf_gate.conv1.bias",
    "self_attention.lf_gate.conv2.weight": "attn.lf_gate.conv2.weight",
    "self_attention.lf_gate.conv2.bias": "attn.lf_gate.conv2.bias",
    "self_attention.lf_gate.norm.weight": "attn.lf_gate.norm.weight",
    "self_attention.linear_proj.weight": "attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attn_norm.weight",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
}
_GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "embed.weight",
    "decoder.final_layernorm.weight": "final_norm.weight",
    "output_layer.weight": "output.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _our_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def megatron_core_to_yuanlfa(
    state_dicts: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    cfg: ModelConfig,
) -> dict[str, torch.Tensor]:
    """yuanlfa's full parameters from a GPTModel built with :func:`get_lfa_gpt_layer_spec`.

    state_dicts: its ``state_dict()``, or one per tensor-parallel rank in rank order (a whole
    pipeline, i.e. pipeline size 1 or stages already merged with global layer numbers).
    ``_extra_state`` entries are skipped; a tied model has no output_layer weight. Raises
    KeyError naming any other tensor it does not know, and any of ours it did not find.
    """
    shards = [state_dicts] if isinstance(state_dicts, Mapping) else list(state_dicts)
    shapes = _full_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, first in shards[0].items():
        if name.endswith("_extra_state") or first is None:
            continue
        ours = _our_name(name)
        if ours is None or ours not in shapes:
            raise KeyError(f"megatron-core tensor {name!r} has no yuanlfa counterpart here")
        out[ours] = _merge(ours, [shard[name] for shard in shards], shapes[ours])
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise KeyError(f"the megatron-core state dict lacks {missing[:4]} for this config")
    return out


def _merge(name: str, parts: list[torch.Tensor], full_shape: tuple[int, ...]) -> torch.Tensor:
    """Reassemble a parameter from tp shards by yuanlfa's slicing rule (shard_pieces): whole
    heads for linear_qk/linear_v, each rank's slice of both SwiGLU halves for linear_fc1 (the
    layout of megatron-core's column-parallel fc1), columns for linear_proj/fc2, vocabulary rows
    for the embedding; the rest replicated."""
    tp = len(parts)
    full = parts[0].new_empty(full_shape)
    for rank, part in enumerate(parts):
        dim, pieces = shard_pieces(name, full_shape, rank, tp)
        if tuple(part.shape) == tuple(full_shape) and pieces == [(0, 0, full_shape[0])]:
            return part.detach().clone()  # replicated
        for local_start, global_start, length in pieces:
            full.narrow(dim, global_start, length).copy_(part.narrow(dim, local_start, length))
    return full


def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from yuanlfa.model import build_model

    return {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}


def yuanlfa_to_megatron_core(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse for one (tensor-parallel size 1) megatron-core GPTModel: our full parameters
    under megatron-core's names (load with ``strict=False`` for its ``_extra_state`` entries)."""
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    inverse_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    out = {}
    for name, tensor in state_dict.items():
        if name in inverse_global:
            out[inverse_global[name]] = tensor
            continue
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match is None or match.group(2) not in inverse_layer:
            raise KeyError(f"yuanlfa parameter {name!r} has no megatron-core counterpart")
        out[f"decoder.layers.{match.group(1)}.{inverse_layer[match.group(2)]}"] = tensor
    return out
