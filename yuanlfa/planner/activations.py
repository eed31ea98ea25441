"""Activation memory: the bytes OUR model code keeps for backward, per layer and per stage.

Every term below names the tensor that holds it; the counts follow what autograd saves in
``model/transformer.py``, ``model/attention.py``, ``ops/lfa``, ``ops/rmsnorm.py`` and
``ops/cross_entropy.py`` (checked against ``saved_tensors_hooks`` in tests/planner). Notation,
per microbatch: T = micro_batch * seq_length tokens, Tq = T / tp under sequence parallelism (else
T), a = activation dtype bytes, n = max(a, 4) (RMSNorm and the loss statistics compute in fp32),
h hidden, f ffn, H heads. Parameters are not activations and are never counted.

Per decoder layer the fixed parts (norms, projections, MLP) are counted here and the filter's
and core attention's own bytes are what they declare (:mod:`.components`; the terms below are
LFA's and softmax attention's). With tp = 1, no sequence parallelism, reference LFA, unfused
norm:

- ``none``: input norm 2n*h + n (its fp32 input, input * rstd, rstd) and its output a*h (input of
  v_proj and the LFA); LFA a*h/2 (conv1 output y) + 2n*h + n (its norm) + a*h (filtered x, input
  of qk_proj); q and k after RoPE, v, the core-attention output 4*a*h, the softmax log-sum-exp
  4*H (SDPA and flash attention keep no score matrix); post-attention norm 2n*h + n + a*h; SwiGLU
  4*a*f (fc1 output 2f, silu 1f, product 1f). In fp32: 29.5*h*4 + 3*4 + 4*H bytes per token
  (118h + 12 + 4H); in bf16 (f = 4h) 3 * (8h + 4) for the norms + 2 * 23.5h = 71h + 12 + 4H,
  plus each norm's fp32 copy of its weight (4h bytes per microbatch, not per token). On a GPU
  (fused norms, Triton LFA, below) bf16 gives 55h + 12 + 4H.
- ``selective``: the core attention is recomputed; since our core attention is SDPA/flash, the
  only thing that disappears is its log-sum-exp (4*H per token): q, k, v stay saved (the
  checkpoint's inputs) and its output stays saved (o_proj's input).
- ``full``: the layer's input only, a*h per token (per Tq under sequence parallelism). With
  train.recompute_method block only the first recompute_num_layers layers of each stage are
  checkpointed; the stage's other layers save what ``none`` says.

On CUDA torch's fused rms_norm saves (input, rstd) instead of (input, input * rstd, rstd): n*h
less per norm. The Triton LFA saves y and one rstd, not its norm's input (recomputed): 2n*h less.
Under tensor parallelism q, k, v, the attention output, the log-sum-exp and the MLP terms divide
by tp; norms and the LFA are replicated (whole sequence) unless sequence parallelism shards them,
in which case every column-parallel layer keeps its own all-gathered (full-sequence) input.

Per stage and microbatch, besides the layers: the RoPE tables (cos and sin, a*head_dim each per
token, shared by the stage's layers), on the first stage the embedding's token ids (int64), on
the last stage the final norm, its output (the loss's input), the labels (int64) and the per-token
log-sum-exp (fp32): the block-wise loss never keeps logits. These are
:class:`StageActivations` ``.saved``. With pp > 1 the pipeline runtime
(torch.distributed.pipelining) also keeps each in-flight microbatch's stage input and output
until its backward; counted under ``pipeline`` (in ``.total``, which the cost model uses) where
no saved tensor already holds them.

Transient workspace (not saved tensors, counted once per rank by the cost model): the recompute
of one layer in backward, and the loss's per-block fp32 logits plus its fp32 weight-gradient
accumulator [V/tp, h] on the last stage.

Not counted: activation gradients in flight during backward, allocator fragmentation, and the
extra copies autocast makes over fp32 parameters (a bf16 copy of each weight and of each linear's
input per microbatch); the planner assumes parameters in the training dtype (Megatron's bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import Config, ModelConfig
from yuanlfa.layout import PipelineLayout
from yuanlfa.layout.schedules import Op, rank_ops
from yuanlfa.planner.components import component_cost, norm_saved_bytes
from yuanlfa.planner.spec import ActivationSpec, Recompute

INDEX_BYTES = 8  # token ids and labels are int64


def resolve_gpu(cfg: Config, gpu: bool | None = None) -> bool:
    """Whether the run executes on a GPU: ``gpu`` when given, else train.device (``auto`` means
    a GPU when torch sees one, as the trainer decides)."""
    if gpu is not None:
        return gpu
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    try:  # the planner runs without torch; then no run of this install sees a GPU either
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def training_dtype_bytes(cfg: Config, gpu: bool) -> int:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    return 2 if precision == "bf16" else 4


def recompute_mode(cfg: Config, pp_rank: int | None = None) -> Recompute:
    """train.recompute, or pipeline rank ``pp_rank``'s entry of train.recompute_stages."""
    return cfg.train.recompute if pp_rank is None else cfg.train.recompute_of(pp_rank)


def activation_spec(
    cfg: Config, gpu: bool | None = None, pp_rank: int | None = None
) -> ActivationSpec:
    """The spec the trainer would run ``cfg`` with (on a GPU or not, see :func:`resolve_gpu`) on
    pipeline rank ``pp_rank`` (its recompute mode)."""
    gpu = resolve_gpu(cfg, gpu)
    impl = cfg.model.lfa_impl
    if impl == "auto":
        impl = "triton" if gpu else "reference"
    p, t = cfg.parallel, cfg.train
    return ActivationSpec(
        micro_batch=t.micro_batch_size,
        seq_length=t.seq_length,
        tp=p.tp,
        sequence_parallel=p.sequence_parallel,
        dtype_bytes=training_dtype_bytes(cfg, gpu),
        fused_norm=gpu,
        lfa_impl=impl,
        recompute=recompute_mode(cfg, pp_rank),
        recompute_layers=t.recompute_num_layers if t.recompute_method == "block" else None,
    )


def layer_activation_bytes(model: ModelConfig, spec: ActivationSpec) -> int:
    """Bytes one decoder layer saves for backward, for one microbatch (see the module doc): the
    fixed parts counted here plus what the filter and core attention declare
    (:mod:`.components`)."""
    a, h, f = spec.dtype_bytes, model.hidden_size, model.ffn_size
    T, Tq, tp, sp = spec.tokens, spec.shard_tokens, spec.tp, spec.sequence_parallel
    if spec.recompute == "full":
        return a * h * Tq  # the checkpoint keeps the layer input only
    filt = component_cost("filter", model)
    core = component_cost("attention", model)
    total = norm_saved_bytes(spec, h, Tq)  # input norm
    total += a * h * T  # the normed input: v_proj's input (all-gathered under SP)
    # qk_proj's input: the filter's output (all-gathered under SP); without a filter the normed
    # input again, a second all-gathered copy under SP.
    if filt is not None or sp:
        total += a * h * T
    if filt is not None:
        total += filt.saved(spec)
    if spec.recompute == "selective":
        total += 3 * a * (h // tp) * T  # the checkpointed core attention keeps q, k, v only
    else:
        total += core.saved(spec)
    total += a * (h // tp) * T  # the core attention's output, o_proj's input
    # Post-attention norm; fc1's input (all-gathered under SP).
    total += norm_saved_bytes(spec, h, Tq) + a * h * T
    total += 4 * a * (f // tp) * T  # fc1 output [.., 2f], silu(a) [.., f], silu(a) * g [.., f]
    return total


def stage_layers_bytes(model: ModelConfig, spec: ActivationSpec, layers: int) -> int:
    """Bytes ``layers`` decoder layers of one stage save for one microbatch: under block
    recompute the first ``spec.recompute_layers`` keep their input only, the rest everything."""
    if spec.recompute != "full" or spec.recompute_layers is None:
        return layers * layer_activation_bytes(model, spec)
    recomputed = min(spec.recompute_layers, layers)
    plain = _replace_recompute(spec, "none")
    return recomputed * layer_activation_bytes(model, spec) + (
        layers - recomputed
    ) * layer_activation_bytes(model, plain)


def shared_bytes(model: ModelConfig, spec: ActivationSpec) -> int:
    """Tensors computed once per stage and read by every layer: the RoPE tables cos and sin
    [s, b, 1, head_dim], and under full recompute the document-start mask (a checkpoint input)."""
    rope = 2 * spec.dtype_bytes * model.head_dim * spec.tokens
    filtered = model.filter_name != "none"
    resets = filtered and model.lfa_reset_at_doc_start and spec.recompute == "full"
    return rope + (spec.tokens if resets else 0)


def embedding_activation_bytes(spec: ActivationSpec) -> int:
    """The embedding keeps its (int64) index; the vocab-parallel one also a bool mask."""
    return (INDEX_BYTES + (1 if spec.tp > 1 else 0)) * spec.tokens


def head_activation_bytes(model: ModelConfig, spec: ActivationSpec) -> int:
    """Final norm, its output (the loss input, all-gathered under SP), labels, log-sum-exp."""
    h, T = model.hidden_size, spec.tokens
    norm = norm_saved_bytes(spec, h, spec.shard_tokens)
    return norm + spec.dtype_bytes * h * T + INDEX_BYTES * T + spec.norm_bytes * T


@dataclass(frozen=True)
class StageActivations:
    """Bytes one microbatch leaves on one stage until its backward."""

    layers: int
    shared: int  # RoPE tables (and the document-start mask), see shared_bytes
    embedding: int
    head: int
    pipeline: int  # stage input/output the pipeline runtime keeps, where nothing else does

    @property
    def saved(self) -> int:
        """What autograd saves (what saved_tensors_hooks sees on a single device)."""
        return self.layers + self.shared + self.embedding + self.head

    @property
    def total(self) -> int:
        return self.saved + self.pipeline


def microbatch_activations(
    model: ModelConfig,
    spec: ActivationSpec,
    layers: int,
    first: bool,
    last: bool,
    num_stages: int = 1,
) -> StageActivations:
    """One microbatch's activations on a stage holding ``layers`` decoder layers."""
    a, h = spec.dtype_bytes, model.hidden_size
    boundary = a * h * spec.shard_tokens  # a stage's input or output, [s(/tp), b, h]
    pipeline = 0
    if num_stages > 1:
        if not last:
            pipeline += boundary  # the output, sent on and kept for backward
        if first:
            # Token ids are the embedding's saved index at tp = 1; tp > 1 saves a shifted copy.
            pipeline += INDEX_BYTES * spec.tokens if spec.tp > 1 else 0
        elif layers == 0 and not last:
            pass  # a pass-through stage's input is its output
        else:
            # The received input is saved as is when the first op reads it in its own dtype:
            # the checkpoint (full recompute), or a norm computing in that dtype (fp32).
            kept = spec.dtype_bytes == spec.norm_bytes or (layers > 0 and spec.recompute == "full")
            pipeline += 0 if kept else boundary
    return StageActivations(
        layers=stage_layers_bytes(model, spec, layers),
        shared=shared_bytes(model, spec) if layers > 0 else 0,
        embedding=embedding_activation_bytes(spec) if first else 0,
        head=head_activation_bytes(model, spec) if last else 0,
        pipeline=pipeline,
    )


def recompute_workspace_bytes(model: ModelConfig, spec: ActivationSpec) -> int:
    """Transient bytes of recomputing one layer (full) or one core attention (selective)."""
    if spec.recompute == "full":
        return layer_activation_bytes(model, _replace_recompute(spec, "none"))
    if spec.recompute == "selective":
        # The core attention's own saved tensors and its output, less the q, k, v kept anyway.
        plain = _replace_recompute(spec, "none")
        qkv = 3 * spec.dtype_bytes * (model.hidden_size // spec.tp) * spec.tokens
        own = component_cost("attention", model).saved(plain) - qkv
        return max(own, 0) + spec.dtype_bytes * (model.hidden_size // spec.tp) * spec.tokens
    return 0


def loss_workspace_bytes(model: ModelConfig, spec: ActivationSpec) -> int:
    """Transient peak of the block-wise loss's backward on the last stage: one block's fp32
    logits (and their cast to the GEMM dtype), the input gradient and the fp32 weight-gradient
    accumulator over the local vocabulary (and its cast back)."""
    if model.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved to size the loss workspace")
    a, n, h, T = spec.dtype_bytes, spec.norm_bytes, model.hidden_size, spec.tokens
    v_local = model.vocab_size // spec.tp
    block = min(model.loss_block_size, T)
    cast = a if a < n else 0
    return (n + cast) * block * v_local + a * T * h + (n + cast) * v_local * h


def _replace_recompute(spec: ActivationSpec, mode: Recompute) -> ActivationSpec:
    from dataclasses import replace

    return replace(spec, recompute=mode)


def outstanding_profile(ops: list[Op]) -> list[dict[int, int]]:
    """After each forward, how many microbatches of each stage hold activations (released by
    their full backward, or by their weight-gradient op when the backward is split: the
    input-gradient op leaves what the weight gradients read)."""
    held: dict[int, int] = {}
    profile = []
    for op in ops:
        if op.kind == "F":
            held[op.stage] = held.get(op.stage, 0) + 1
            profile.append(dict(held))
        elif op.kind in ("B", "W"):
            held[op.stage] -= 1
    return profile


def in_flight_microbatches(
    schedule: str, pp: int, pp_rank: int, num_microbatches: int, virtual_stages: int = 1
) -> int:
    """Most (microbatch, stage) forwards whose activations rank ``pp_rank`` holds at once.

    GPipe: m. 1F1B: min(pp - rank, m) (rank 0-based). Interleaved 1F1B: min((v - 1) * round +
    2 * (pp - 1 - rank) + 1, m * v) with round = m / max(1, m // pp) (Megatron's count when pp
    divides m). Zero-bubble variants: activations live until the weight-gradient op. Counted
    from the schedule's operation order (:func:`yuanlfa.layout.schedules.rank_ops`).
    """
    ops = rank_ops(schedule, pp, pp_rank, num_microbatches, virtual_stages)
    return max(sum(p.values()) for p in outstanding_profile(ops))


def num_microbatches(cfg: Config) -> int:
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * (cfg.parallel.dp or 1))


def peak_rank_bytes(ops: list[Op], stage_bytes: dict[int, int]) -> tuple[int, dict[int, int]]:
    """The rank's peak of held activation bytes and, at that moment, microbatches per stage."""
    best, at = 0, {}
    for held in outstanding_profile(ops):
        total = sum(count * stage_bytes[s] for s, count in held.items())
        if total > best:
            best, at = total, held
    return best, at


def stage_activation_bytes(
    cfg: Config,
    layout: PipelineLayout,
    stage: int,
    in_flight: int | None = None,
    *,
    gpu: bool | None = None,
    pipeline_buffers: bool = False,
) -> int:
    """Bytes of activations stage ``stage`` holds at its pipeline rank's peak.

    ``in_flight`` microbatches (default: how many of this stage's microbatches the configured
    schedule holds at the rank's peak; :func:`in_flight_microbatches` for one stage per rank)
    times :func:`microbatch_activations` of this stage: its ``saved`` bytes, i.e. what autograd
    keeps (tensors sharing a storage once, parameters excluded: what ``saved_tensors_hooks``
    sees), with the rank's recompute mode (train.recompute_stages). ``pipeline_buffers`` adds
    the stage inputs/outputs the pipeline runtime keeps (``.total``). Transient workspaces are
    not included. Under the pipeline runner the int64 token ids and labels of all microbatches
    are views of one batch tensor, so what really stays alive for them is the whole local
    batch's (8 bytes per token, negligible); they are counted per microbatch here.
    ``gpu`` as in :func:`resolve_gpu`.
    """
    rank = layout.rank_of_stage(stage)
    spec = activation_spec(cfg, gpu, rank)

    def per_microbatch(s: int) -> int:
        acts = microbatch_activations(
            cfg.model,
            spec,
            layout.blocks[s],
            layout.is_first(s),
            layout.is_last(s),
            layout.num_stages,
        )
        return acts.total if pipeline_buffers else acts.saved

    if in_flight is None:
        ops = rank_ops(
            cfg.parallel.schedule, layout.pp, rank, num_microbatches(cfg), layout.virtual_stages
        )
        mine = {s: per_microbatch(s) for s in layout.stages_of_rank(rank)}
        _, held = peak_rank_bytes(ops, mine)
        in_flight = held.get(stage, 0)
    return in_flight * per_microbatch(stage)
