"""The activation formula against the bytes our model really saves for backward.

Saved tensors are collected with ``saved_tensors_hooks`` during a forward, deduplicated by
storage (views of one buffer count once, as the memory does) and excluding parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tests.distributed.launcher import run_distributed
from yuanlfa.config import ModelConfig, config_from_dict, resolve
from yuanlfa.layout import PipelineLayout
from yuanlfa.layout.ranks import stages_of_rank
from yuanlfa.layout.schedules import rank_ops
from yuanlfa.model import create_model
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.recompute import apply_recompute
from yuanlfa.planner.activations import (
    ActivationSpec,
    in_flight_microbatches,
    layer_activation_bytes,
    microbatch_activations,
    stage_activation_bytes,
)

MODES = ("none", "selective", "full")
# (hidden, heads, seq, micro batch)
SHAPES = [(64, 4, 32, 2), (128, 8, 64, 1)]
TOLERANCE = 0.01  # smaller than any single term (y, h/2 of ~30h per token, is 1.7%)


def _model_cfg(hidden: int, heads: int, layers: int, **extra) -> ModelConfig:
    model = {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "vocab_size": 256}
    return config_from_dict({"model": {**model, **extra}}).model


def saved_bytes(model: YuanModel, forward) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def measure(
    cfg: ModelConfig,
    seq: int,
    micro: int,
    mode: str,
    dtype: torch.dtype = torch.float32,
    layer_ids=None,
    first: bool = True,
    last: bool = True,
) -> int:
    model = YuanModel(cfg, layer_ids, has_embedding=first, has_head=last)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = apply_recompute(model, mode).to(dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (micro, seq), generator=g)
    hidden = None
    if not first:
        hidden = torch.randn(seq, micro, cfg.hidden_size, dtype=dtype, requires_grad=True)

    def forward() -> None:
        out = model(ids if first else None, hidden=hidden, labels=labels if last else None)
        out.float().sum()

    return saved_bytes(model, forward)


def _spec(seq: int, micro: int, mode: str, dtype: torch.dtype = torch.float32) -> ActivationSpec:
    return ActivationSpec(
        micro_batch=micro,
        seq_length=seq,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        recompute=mode,
    )


def _close(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_whole_model_fp32(shape, mode: str) -> None:
    hidden, heads, seq, micro = shape
    cfg = _model_cfg(hidden, heads, 2)
    predicted = microbatch_activations(cfg, _spec(seq, micro, mode), 2, True, True).saved
    measured = measure(cfg, seq, micro, mode)
    assert _close(predicted, measured), (predicted, measured)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_layer_fp32(shape, mode: str) -> None:
    """One more layer adds exactly the per-layer bytes."""
    hidden, heads, seq, micro = shape
    one = measure(_model_cfg(hidden, heads, 3), seq, micro, mode, layer_ids=[0])
    three = measure(_model_cfg(hidden, heads, 3), seq, micro, mode)
    per_layer = layer_activation_bytes(_model_cfg(hidden, heads, 3), _spec(seq, micro, mode))
    assert _close(per_layer, (three - one) // 2), (per_layer, (three - one) // 2)


def test_selective_drops_only_the_softmax_statistics() -> None:
    """Our core attention keeps no score matrix, so selective recompute saves 4 bytes per head
    per token: the log-sum-exp."""
    cfg = _model_cfg(64, 4, 2)
    none = measure(cfg, 32, 2, "none")
    selective = measure(cfg, 32, 2, "selective")
    assert none - selective == 2 * 4 * cfg.num_heads * 32 * 2


@pytest.mark.parametrize(
    "extra", [{"lfa": False}, {"lfa_reset_at_doc_start": True}, {"ffn_hidden_size": 96}]
)
@pytest.mark.parametrize("mode", MODES)
def test_model_variants(extra: dict, mode: str) -> None:
    cfg = _model_cfg(64, 4, 2, **extra)
    predicted = microbatch_activations(cfg, _spec(48, 3, mode), 2, True, True).saved
    measured = measure(cfg, 48, 3, mode)
    assert _close(predicted, measured), (predicted, measured)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_parameters(mode: str) -> None:
    """bf16 activations; norms still compute (and save) in fp32."""
    cfg = _model_cfg(64, 4, 2)
    spec = _spec(32, 2, mode, torch.bfloat16)
    predicted = microbatch_activations(cfg, spec, 2, True, True).saved
    measured = measure(cfg, 32, 2, mode, torch.bfloat16)
    assert _close(predicted, measured), (predicted, measured)


@pytest.mark.parametrize("first,last", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("mode", ["none", "full"])
def test_stage_extras(first: bool, last: bool, mode: str) -> None:
    """Stages without the embedding or the head: only their own extras are counted."""
    cfg = _model_cfg(64, 4, 4)
    predicted = microbatch_activations(cfg, _spec(32, 2, mode), 2, first, last).saved
    measured = measure(cfg, 32, 2, mode, layer_ids=[1, 2], first=first, last=last)
    assert _close(predicted, measured), (predicted, measured)


def _tp_worker(rank: int, world: int, cases: list) -> list[tuple[int, int]]:
    import torch.distributed as dist

    from yuanlfa.parallel.tp.plan import apply_tensor_parallel

    out = []
    for sp, mode in cases:
        cfg = _model_cfg(64, 4, 2)
        model = create_model(cfg, seed=0)
        model = apply_tensor_parallel(model, dist.group.WORLD, sp, cfg.loss_block_size)
        model = apply_recompute(model, mode)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (2, 32), generator=g)
        labels = torch.randint(0, 256, (2, 32), generator=g)
        positions = torch.arange(32).expand(2, 32)
        forward = functools.partial(model, ids, positions, labels=labels)
        measured = saved_bytes(model, forward)
        spec = dataclasses.replace(_spec(32, 2, mode), tp=world, sequence_parallel=sp)
        out.append((measured, microbatch_activations(cfg, spec, 2, True, True).saved))
    return out


def test_tensor_and_sequence_parallel() -> None:
    cases = [(False, "none"), (True, "none"), (True, "selective"), (True, "full")]
    results = run_distributed(_tp_worker, 2, cases)
    for case, per_rank in zip(cases, zip(*results)):
        # Rank 0 of a sequence-parallel group has no halo to keep: the formula is the maximum.
        measured = max(m for m, _ in per_rank)
        predicted = per_rank[0][1]
        assert _close(predicted, measured), (case, predicted, measured)


@pytest.mark.parametrize("pp,m", [(4, 8), (4, 3), (1, 5), (8, 8)])
def test_in_flight_counts(pp: int, m: int) -> None:
    for r in range(pp):
        assert in_flight_microbatches("1f1b", pp, r, m) == min(pp - r, m)
        assert in_flight_microbatches("gpipe", pp, r, m) == m


@pytest.mark.parametrize("pp,v,m", [(4, 2, 8), (4, 3, 8), (2, 2, 4), (4, 2, 16)])
def test_interleaved_in_flight_is_megatrons(pp: int, v: int, m: int) -> None:
    for r in range(pp):
        warmup = (pp - r - 1) * 2 + (v - 1) * pp
        count = in_flight_microbatches("interleaved_1f1b", pp, r, m, v)
        assert count == min(warmup + 1, m * v)
        # Zero bubble keeps activations until the weight gradients: never fewer than 1F1B.
        assert in_flight_microbatches("zero_bubble", pp, r, m, v) >= min(pp - r, m)


@pytest.mark.parametrize(
    "schedule,v",
    [
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved_1f1b", 2),
        ("zero_bubble", 2),
        ("zbv", 2),
        ("dualpipev", 2),
    ],
)
def test_rank_ops_run_every_pass_once_in_order(schedule: str, v: int) -> None:
    pp, m = 4, 8
    placement = "v" if schedule in ("zbv", "dualpipev") else "looped"
    for r in range(pp):
        ops = rank_ops(schedule, pp, r, m, v)
        stages = set(stages_of_rank(r, pp, v, placement))
        # Every (stage, microbatch) runs one forward and one backward: full (B), or input
        # gradients (I) and, after them, weight gradients (W).
        forwards = sorted((op.stage, op.microbatch) for op in ops if op.kind == "F")
        backwards = sorted((op.stage, op.microbatch) for op in ops if op.kind in ("B", "I"))
        weights = sorted((op.stage, op.microbatch) for op in ops if op.kind == "W")
        inputs = sorted((op.stage, op.microbatch) for op in ops if op.kind == "I")
        everything = sorted((s, i) for s in stages for i in range(m))
        assert forwards == backwards == everything
        assert weights == inputs
        if schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
            assert not weights
        if schedule in ("zero_bubble", "zbv"):
            assert weights == everything
        position = {(op.kind, op.stage, op.microbatch): i for i, op in enumerate(ops)}
        for s in stages:
            for i in range(m):
                back = position.get(("B", s, i), position.get(("I", s, i)))
                assert position[("F", s, i)] < back
                assert position.get(("W", s, i), back) >= back


def test_stage_activation_bytes_counts_in_flight_and_pipeline_buffers() -> None:
    cfg = resolve(
        config_from_dict(
            {
                "model": {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "vocab_size": 256},
                "parallel": {"pp": 3, "pipeline_blocks": [1, 2, 3]},
                "train": {"micro_batch_size": 2, "global_batch_size": 16, "seq_length": 32},
            }
        ),
        world_size=3,
    )
    layout = PipelineLayout((1, 2, 3), pp=3)
    spec = _spec(32, 2, "none")
    for stage in range(3):
        first, last = stage == 0, stage == 2
        per_mb = microbatch_activations(cfg.model, spec, layout.blocks[stage], first, last, 3)
        # fp32: the received input is the first norm's saved input; only the output is extra.
        assert per_mb.pipeline == (0 if last else 4 * 64 * 64)
        in_flight = min(3 - stage, 8)
        assert stage_activation_bytes(cfg, layout, stage, gpu=False) == in_flight * per_mb.saved
        got = stage_activation_bytes(cfg, layout, stage, gpu=False, pipeline_buffers=True)
        assert got == in_flight * per_mb.total
        assert stage_activation_bytes(cfg, layout, stage, 1, gpu=False) == per_mb.saved


def test_recompute_per_pipeline_rank() -> None:
    data = {
        "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 256},
        "parallel": {"pp": 2},
        "train": {"seq_length": 32, "recompute_stages": ["full", "none"]},
    }
    cfg = resolve(config_from_dict(data), world_size=2)
    layout = PipelineLayout((2, 2), pp=2)
    full = layer_activation_bytes(cfg.model, dataclasses.replace(_spec(32, 1, "full")))
    first = stage_activation_bytes(cfg, layout, 0, 1, gpu=False)
    last = stage_activation_bytes(cfg, layout, 1, 1, gpu=False)
    assert first == microbatch_activations(cfg.model, _spec(32, 1, "full"), 2, True, False).saved
    assert last == microbatch_activations(cfg.model, _spec(32, 1, "none"), 2, False, True).saved
    assert full == 4 * 64 * 32
