"""The collectives our training code runs, counted where the code runs them and costed with the
ring formulas of :mod:`.links`.

Tensor parallelism (``yuanlfa.parallel.tp``), per layer and microbatch, act = the
full activation [s, b, h] in the activation dtype:

- without sequence parallelism the row-parallel o_proj and fc2 all-reduce their outputs in the
  forward (2), and the column-parallel v_proj, qk_proj and fc1 each all-reduce their own input's
  gradient in the backward (3: v_proj reads x and qk_proj reads LF(x), two tensors, so the
  attention block costs one all-reduce more than Megatron's GPT; counted by wrapping
  torch.distributed in a tp=2 run, 5 per layer);
- with it each column-parallel input is all-gathered (3) and each row-parallel output
  reduce-scattered (2) in the forward, the reverse in the backward, plus the filter's halo (an
  all-gather of its ``halo_tokens`` rows per rank each way: LFA's 2, a conv filter's kernel - 1),
  or, for a filter reading the whole sequence, an all-gather forward and a reduce-scatter back;
- a filter's or core attention's own column- and row-parallel layers (plug-ins, as they declare
  in :mod:`.components`) add theirs the same way.

Per stage and microbatch: the vocab-parallel embedding sums its output (all-reduce, or
reduce-scatter under SP) on the first stage; the head's input is copied (its gradient
all-reduced) or all-gathered (reduce-scattered back) on the last, where the block-wise loss also
all-reduces its per-token max (4 bytes) and statistics (8 bytes) once per block of tokens.

Per step: the data-parallel gradient reduction in buckets of ``parallel.grad_bucket_size``
elements (all-reduce, or with the distributed optimizer a reduce-scatter of the fp32 gradients
and an all-gather of the parameters), each bucket paying its ring's latency; the tied
embedding's gradient summed between the first and last pipeline stage (its dp slice under the
distributed optimizer); under SP the replicated weights' (norms, LFA) gradients summed over tp.
Small per-step reductions (loss, token count, gradient norm) are left out.

The backend's reduce-scatter (:func:`reduce_scatter_bytes`, :func:`reduce_scatter_s`): NCCL's is
a ring, sending (n - 1) / n of the buffer per rank. gloo (torch 2.13) has none: both
``reduce_scatter_tensor`` and the list form send the whole buffer per rank on 2 ranks, as an
all-reduce does (counted on a network namespace's loopback, tests/planner/test_comm_backend.py),
so on gloo a reduce-scatter is costed as the all-reduce it performs. The all-gather and
all-reduce are rings on both.
"""

from __future__ import annotations

import math

from yuanlfa.config import ModelConfig
from yuanlfa.layout.traffic import ring_all_reduce_bytes, ring_reduce_scatter_bytes
from yuanlfa.planner.components import component_cost
from yuanlfa.planner.links import (
    Link,
    ring_all_gather_s,
    ring_all_reduce_s,
    ring_reduce_scatter_s,
)
from yuanlfa.planner.memory import StateBytes
from yuanlfa.planner.spec import ActivationSpec

COLUMN_PARALLEL = 3  # v_proj, qk_proj, fc1: each takes its own copy (or gather) of its input
ROW_PARALLEL = 2  # o_proj, fc2: each sums (or reduce-scatters) its output
LOSS_STAT_BYTES = 4 + 8  # per token: the max, then (sum of exp, target logit)
# Backends whose reduce-scatter sends what an all-reduce sends (see the module doc).
REDUCE_SCATTER_AS_ALL_REDUCE = frozenset({"gloo"})


def backend_of(gpu: bool) -> str:
    """The process group's backend, as yuanlfa.train.distributed picks it."""
    return "nccl" if gpu else "gloo"


def reduce_scatter_bytes(nbytes: float, n: int, backend: str) -> float:
    """Bytes each rank sends in ``backend``'s reduce-scatter of an ``nbytes`` buffer."""
    if backend in REDUCE_SCATTER_AS_ALL_REDUCE:
        return ring_all_reduce_bytes(nbytes, n)
    return ring_reduce_scatter_bytes(nbytes, n)


def reduce_scatter_s(nbytes: float, n: int, link: Link, backend: str) -> float:
    """Seconds of ``backend``'s reduce-scatter of an ``nbytes`` buffer over ``n`` ranks."""
    if backend in REDUCE_SCATTER_AS_ALL_REDUCE:
        return ring_all_reduce_s(nbytes, n, link)
    return ring_reduce_scatter_s(nbytes, n, link)


def _act(model: ModelConfig, spec: ActivationSpec) -> int:
    return spec.dtype_bytes * model.hidden_size * spec.tokens


def layer_tp_s(
    model: ModelConfig, spec: ActivationSpec, sequence_parallel: bool, link: Link
) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's tp collectives for one microbatch."""
    tp = spec.tp
    if tp == 1:
        return 0.0, 0.0
    act = _act(model, spec)
    filt = component_cost("filter", model)
    parts = [c for c in (filt, component_cost("attention", model)) if c is not None]
    columns = COLUMN_PARALLEL + sum(c.column_inputs or 0.0 for c in parts)
    rows = ROW_PARALLEL + sum(c.row_outputs or 0.0 for c in parts)
    if not sequence_parallel:
        return rows * ring_all_reduce_s(act, tp, link), columns * ring_all_reduce_s(act, tp, link)
    gather, scatter = ring_all_gather_s(act, tp, link), ring_reduce_scatter_s(act, tp, link)
    forward = columns * gather + rows * scatter
    backward = columns * scatter + rows * gather
    if filt is not None and filt.halo_tokens is None:  # the whole sequence gathered
        forward, backward = forward + gather, backward + scatter
    elif filt is not None and filt.halo_tokens:
        rows_bytes = filt.halo_tokens * spec.micro_batch * model.hidden_size * spec.dtype_bytes
        halo = ring_all_gather_s(tp * rows_bytes, tp, link)
        forward, backward = forward + halo, backward + halo
    return forward, backward


def embedding_tp_s(
    model: ModelConfig, spec: ActivationSpec, sequence_parallel: bool, link: Link
) -> float:
    """The vocab-parallel embedding's forward sum (its backward needs none)."""
    if spec.tp == 1:
        return 0.0
    collective = ring_reduce_scatter_s if sequence_parallel else ring_all_reduce_s
    return collective(_act(model, spec), spec.tp, link)


def head_tp_s(
    model: ModelConfig, spec: ActivationSpec, sequence_parallel: bool, link: Link
) -> tuple[float, float]:
    """(forward, backward) seconds of the head input's copy or gather and the loss's sums."""
    tp = spec.tp
    if tp == 1:
        return 0.0, 0.0
    act = _act(model, spec)
    blocks = math.ceil(spec.tokens / model.loss_block_size)
    block_tokens = spec.tokens / blocks
    # Two small all-reduces per block: latency-bound wherever the link is slow to answer.
    stats = blocks * (
        ring_all_reduce_s(4 * block_tokens, tp, link)
        + ring_all_reduce_s(8 * block_tokens, tp, link)
    )
    if sequence_parallel:
        return ring_all_gather_s(act, tp, link) + stats, ring_reduce_scatter_s(act, tp, link)
    return stats, ring_all_reduce_s(act, tp, link)


def dp_step_s(
    params: int,
    dp: int,
    state: StateBytes,
    distributed: bool,
    bucket_elements: int,
    link: Link,
    backend: str = "nccl",
) -> float:
    """One step's data-parallel reduction of a rank holding ``params`` parameters."""
    if dp == 1 or params == 0:
        return 0.0
    buckets = math.ceil(params / bucket_elements)
    grads, weights = params * state.grads / buckets, params * state.weights / buckets
    if distributed:
        per_bucket = reduce_scatter_s(grads, dp, link, backend)
        per_bucket += ring_all_gather_s(weights, dp, link)
    else:
        per_bucket = ring_all_reduce_s(grads, dp, link)
    return buckets * per_bucket


def tied_embedding_s(
    embedding_params: int, dp: int, state: StateBytes, distributed: bool, link: Link
) -> float:
    """The first and last stage sum their copies' gradients (a 2-rank all-reduce)."""
    nbytes = embedding_params * state.grads / (dp if distributed else 1)
    return ring_all_reduce_s(nbytes, 2, link)


def replicated_grads_s(params: int, tp: int, state: StateBytes, link: Link) -> float:
    """Under sequence parallelism: the tp sum of the replicated weights' gradients."""
    return ring_all_reduce_s(params * state.grads, tp, link) if params else 0.0
