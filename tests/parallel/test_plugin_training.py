"""Acceptance of the research API: a filter and a core attention defined in a user's own file
(outside the package, loaded through model.plugins) train at tp=2 (sharded and replicated
plug-in parameters; with sequence parallelism, halo and whole-sequence filters) and at pp=2,
checkpoint and resume, and equal one process (fp32): losses step by step, and the saved
weights, each read back by name."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.model.plugin_source import write_plugin
from tests.tiny import tiny_overrides
from yuanlfa.checkpoint import CheckpointError, latest_checkpoint
from yuanlfa.checkpoint.convert.hf import export_hf
from yuanlfa.checkpoint.storage import read_tensor, stored_tensors
from yuanlfa.config import config_from_dict
from yuanlfa.parallel.tp.comm import gather_seq, split_seq
from yuanlfa.train import train

STEPS = 6
PLUGINS = {"model__filter": "test_gated_taps", "model__attention": "test_scaled"}


@pytest.fixture
def plugin_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A user's plug-in file outside the package (tests/model/plugin_source.py)."""
    return write_plugin(tmp_path_factory.mktemp("user_plugins"))


def _train(corpus: str, plugin: str, **extra: object) -> list[float]:
    cfg = tiny_overrides(corpus, train__steps=STEPS, model__plugins=[plugin], **extra)
    return [r["loss"] for r in train(config_from_dict(cfg), progress=False).records]


def _runs(rank: int, world: int, corpus: str, plugin: str, dirs: dict[str, str]) -> dict:
    tp = {"parallel__tp": 2}
    out = {}
    # tp=2: stop after step 3 (checkpoint), then resume to the end.
    first = _train(corpus, plugin, **PLUGINS, **tp, checkpoint__dir=dirs["tp"],
                   train__exit_interval=3)  # fmt: skip
    rest = _train(corpus, plugin, **PLUGINS, **tp, checkpoint__dir=dirs["tp"],
                  checkpoint__resume=True)  # fmt: skip
    out["tp2 + resume"] = first + rest
    out["pp2"] = _train(corpus, plugin, **PLUGINS, parallel__pp=2, checkpoint__dir=dirs["pp"])
    sp = {**tp, "parallel__sequence_parallel": True, "model__attention": "test_scaled"}
    out["tp2 + sp, halo filter"] = _train(corpus, plugin, **sp, model__filter="test_taps")
    return out


@pytest.mark.slow
def test_user_plugin_trains_at_tp2_and_pp2_and_checkpoints(
    small_corpus: str,
    plugin_file: str,
    tmp_path,
) -> None:
    dirs = {k: str(tmp_path / k) for k in ("single", "tp", "pp")}
    single = _train(small_corpus, plugin_file, **PLUGINS, checkpoint__dir=dirs["single"])
    taps = _train(small_corpus, plugin_file, model__filter="test_taps",
                  model__attention="test_scaled")  # fmt: skip
    assert single[-1] < single[0]
    results = run_distributed(_runs, 2, small_corpus, plugin_file, dirs, timeout=600)
    for rank_result in results:
        for name, losses in rank_result.items():
            ref = taps if "halo" in name else single
            assert losses == pytest.approx(ref, rel=1e-5), name
    # The checkpoints hold the same weights under the same names, whoever wrote which shard.
    ref_dir = latest_checkpoint(dirs["single"])
    names = sorted(k for k in stored_tensors(ref_dir) if k.startswith("model."))
    assert "model.layers.0.attn.core.head_scale" in names
    assert "model.layers.1.attn.lf_gate.up.weight" in names
    # The Yuan 2.0 release formats have no place for plug-ins: refused before writing anything.
    with pytest.raises(CheckpointError, match="cannot hold this model: model.filter"):
        export_hf(ref_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    for layout in ("tp", "pp"):
        path = latest_checkpoint(dirs[layout])
        assert path.name == ref_dir.name
        for name in names:
            torch.testing.assert_close(
                read_tensor(path, name),
                read_tensor(ref_dir, name),
                # Adam turns gradient rounding into update noise of ~1e-6; an unsummed or
                # misplaced shard moves a weight by ~lr = 3e-3.
                rtol=1e-4,
                atol=1e-5,
                msg=lambda m, name=name, layout=layout: f"{layout} {name}: {m}",
            )


def _check_sp_filters(rank: int, world: int, plugin: str) -> None:
    """Each filter on sequence shards (halo, whole sequence, pointwise) equals the full-sequence
    filter: outputs, input gradients and summed parameter gradients, documents included."""
    from yuanlfa.config import ModelConfig
    from yuanlfa.model.registry import build_component, load_plugins
    from yuanlfa.parallel.grads import allreduce_replicated_grads
    from yuanlfa.parallel.tp.plugin import SequenceParallelFilterForward

    load_plugins([plugin])
    group = dist.group.WORLD
    cases = [("conv", 3), ("conv", 1), ("lfa_no_norm", 2), ("test_taps", 2),
             ("test_running_mean", 2), ("conv", 7)]  # fmt: skip
    for name, kernel in cases:
        cfg = ModelConfig(hidden_size=16, num_heads=2, filter=name, filter_kernel=kernel)
        torch.manual_seed(0)
        full = build_component("filter", cfg).double()
        shard = build_component("filter", cfg).double()
        with torch.no_grad():
            for p, q in zip(full.parameters(), shard.parameters()):
                p.copy_(torch.randn_like(p) * 0.3)
                q.copy_(p)
        shard.forward = SequenceParallelFilterForward(shard, shard.forward, group)
        gen = torch.Generator().manual_seed(5)
        s, b = 5 * world, 2  # shards of 5 tokens: shorter than conv 7's 6-token halo
        x = torch.randn(s, b, 16, generator=gen, dtype=torch.float64)
        starts = torch.rand(s, b, generator=gen) < 0.3
        g = torch.randn(s, b, 16, generator=gen, dtype=torch.float64)
        ref_x = x.clone().requires_grad_()
        ref = full(ref_x, doc_start=starts)
        ref.backward(g)
        xin = x.clone().requires_grad_()
        out = shard(split_seq(xin, group), doc_start=starts)
        torch.testing.assert_close(gather_seq(out, group), ref.detach(), msg=name)
        out.backward(g.chunk(world)[rank])
        torch.testing.assert_close(xin.grad, ref_x.grad, msg=name)
        params = list(shard.parameters())
        allreduce_replicated_grads(params, group)
        for p, q in zip(params, full.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
def test_sequence_parallel_filters_equal_full_sequence(plugin_file: str) -> None:
    run_distributed(_check_sp_filters, 2, plugin_file)
