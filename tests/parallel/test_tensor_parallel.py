"""Tensor and sequence parallelism against the single-device model (gloo, 2 and 4 ranks)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from yuanlfa.config import ConfigError, ModelConfig, ParallelConfig, config_from_dict
from yuanlfa.layout import rank_coords
from yuanlfa.model import build_model, create_model, materialize
from yuanlfa.ops.lfa import lfa_reference
from yuanlfa.parallel import apply_tensor_parallel, build_mesh, shard_full_tensor
from yuanlfa.parallel.grads import allreduce_replicated_grads, global_grad_norm
from yuanlfa.parallel.tp.comm import gather_seq, split_seq
from yuanlfa.parallel.tp.layers import SequenceParallelLFA

SEED = 11


def _model_cfg(**kw) -> ModelConfig:
    base = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}
    return config_from_dict({"model": {**base, **kw}}).model


def _batch(cfg: ModelConfig, b: int = 2, s: int = 16):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=gen)
    pos = torch.arange(s).repeat(b, 1)
    pos[0, 7:] -= 7  # a document boundary inside the first sample
    return ids[:, :-1], pos, ids[:, 1:]


def _loss_and_grads(model, ids, pos, labels, weights):
    losses = model(ids, pos, labels=labels)
    loss = (losses * weights).sum()
    loss.backward()
    return losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check_model(rank: int, world: int, sequence_parallel: bool, reset: bool) -> float:
    cfg = _model_cfg(lfa_reset_at_doc_start=reset, loss_block_size=5)
    ids, pos, labels = _batch(cfg)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    ref = create_model(cfg, SEED)
    ref_losses, ref_grads = _loss_and_grads(ref, ids, pos, labels, weights)

    group = dist.group.WORLD
    model = build_model(cfg)
    apply_tensor_parallel(model, group, sequence_parallel, cfg.loss_block_size)
    materialize(model, cfg, SEED, shard=lambda n, t: shard_full_tensor(n, t, cfg, rank, world))
    losses, grads = _loss_and_grads(model, ids, pos, labels, weights)
    params = list(model.parameters())
    if sequence_parallel:
        allreduce_replicated_grads(params, group)
        for n, p in model.named_parameters():
            grads[n] = p.grad
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        expected = shard_full_tensor(name, ref_grads[name], cfg, rank, world)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)
    ref_norm = global_grad_norm(list(ref.parameters()))
    norm = global_grad_norm(params, group)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    return norm


def _check_model_variants(rank: int, world: int) -> list[float]:
    # One launch for all variants: process start-up dominates these tests.
    return [_check_model(rank, world, sp, reset) for sp, reset in VARIANTS]


VARIANTS = ((False, False), (True, False), (True, True))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_model_matches_single_device(world: int) -> None:
    norms = run_distributed(_check_model_variants, world)
    for i in range(len(VARIANTS)):
        assert len({rank_norms[i] for rank_norms in norms}) == 1


def _check_layers(rank: int, world: int) -> None:
    """Each parallel layer against its single-device twin, outputs and all gradients."""
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(1)
    s, b, h, out = 8, 2, 16, 12
    x = torch.randn(s, b, h, generator=gen, dtype=torch.float64)
    w_col = torch.randn(out * world, h, generator=gen, dtype=torch.float64)
    w_row = torch.randn(h, out * world, generator=gen, dtype=torch.float64)
    g = torch.randn(s, b, h, generator=gen, dtype=torch.float64)
    from yuanlfa.parallel.tp.layers import ColumnParallelLinear, RowParallelLinear

    for sp in (False, True):
        ref_x = x.clone().requires_grad_()
        ref_wc = w_col.clone().requires_grad_()
        ref_wr = w_row.clone().requires_grad_()
        ref_y = torch.nn.functional.linear(torch.nn.functional.linear(ref_x, ref_wc), ref_wr)
        ref_y.backward(g)

        col = ColumnParallelLinear(w_col.chunk(world)[rank].clone(), group, sp)
        row = RowParallelLinear(w_row.chunk(world, dim=1)[rank].clone(), group, sp)
        xin = x.clone().requires_grad_()
        local_x = split_seq(xin, group) if sp else xin
        y = row(col(local_x))
        full_y = gather_seq(y, group) if sp else y
        torch.testing.assert_close(full_y, ref_y.detach())
        full_y.backward(g / (world if sp else 1))
        torch.testing.assert_close(col.weight.grad, ref_wc.grad.chunk(world)[rank])
        torch.testing.assert_close(row.weight.grad, ref_wr.grad.chunk(world, dim=1)[rank])
        # split_seq's backward all-gathers the shards' gradients: every rank holds all of it.
        torch.testing.assert_close(xin.grad, ref_x.grad)


@pytest.mark.slow
def test_parallel_layers_match_single_device() -> None:
    run_distributed(_check_layers, 2)


def _check_sp_lfa(rank: int, world: int) -> None:
    """LFA on sequence shards with the halo == rows of the full-sequence filter, with grads."""
    group = dist.group.WORLD
    cfg = _model_cfg()
    f64 = torch.float64
    full = create_model(cfg, SEED, dtype=f64).layers["0"].attn.lf_gate
    inner = create_model(cfg, SEED, dtype=f64).layers["0"].attn.lf_gate
    shard = SequenceParallelLFA(inner, group)
    gen = torch.Generator().manual_seed(9)
    s, b, h = 4 * world, 3, cfg.hidden_size
    x = torch.randn(s, b, h, generator=gen, dtype=f64)
    doc_start = torch.rand(s, b, generator=gen) < 0.2
    doc_start[0] = True
    g = torch.randn(s, b, h, generator=gen, dtype=f64)
    ref_x = x.clone().requires_grad_()
    ref_out, _ = lfa_reference(
        ref_x, full.conv1.weight, full.conv1.bias, full.conv2.weight, full.conv2.bias,
        full.norm.weight, full.eps, doc_start=doc_start,
    )  # fmt: skip
    ref_out.backward(g)
    xin = x.clone().requires_grad_()
    out, _ = shard(split_seq(xin, group), doc_start=doc_start)
    torch.testing.assert_close(gather_seq(out, group), ref_out.detach())
    out.backward(g.chunk(world)[rank])
    torch.testing.assert_close(xin.grad, ref_x.grad)
    params = list(shard.parameters())
    allreduce_replicated_grads(params, group)
    for p, q in zip(params, full.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.slow
def test_sequence_parallel_lfa_rows_equal_full_sequence() -> None:
    run_distributed(_check_sp_lfa, 4)


def test_rank_order_and_mesh_validation() -> None:
    sizes = {"tp": 2, "dp": 3, "pp": 2}
    coords = [rank_coords(("tp", "dp", "pp"), sizes, r) for r in range(12)]
    assert [c["tp"] for c in coords[:4]] == [0, 1, 0, 1]
    assert [c["pp"] for c in coords] == [0] * 6 + [1] * 6
    other = rank_coords(("dp", "tp", "pp"), sizes, 1)
    assert other == {"dp": 1, "tp": 0, "pp": 0}
    with pytest.raises(ConfigError, match="world size"):
        build_mesh(ParallelConfig(tp=2, pp=2), world_size=6, rank=0)
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_mesh(ParallelConfig(tp=8), world_size=8, rank=0, model=_model_cfg())
    cfg = dataclasses.replace(_model_cfg(), vocab_size=101)
    with pytest.raises(ConfigError, match="vocab"):
        build_mesh(ParallelConfig(tp=2), world_size=2, rank=0, model=cfg)


def test_fc1_sharding_keeps_silu_and_linear_halves() -> None:
    cfg = _model_cfg()
    f = cfg.ffn_size
    full = torch.arange(2 * f, dtype=torch.float32).unsqueeze(1).expand(2 * f, 3)
    part = shard_full_tensor("layers.0.mlp.fc1.weight", full, cfg, 1, 2)
    rows = part[:, 0].long().tolist()
    assert rows == list(range(f // 2, f)) + list(range(f + f // 2, 2 * f))
    qk = shard_full_tensor("layers.0.attn.qk_proj.weight", full[: 2 * 64], cfg, 1, 2)
    # Rows of whole heads (2 * head_dim each): heads 2 and 3 on rank 1.
    assert qk[:, 0].long().tolist() == list(range(64, 128))
