"""Pipeline parallelism equals one process: gradients of one step by parameter name, and the
losses, gradient norms and eval loss of 20 training steps, for uneven splits, every schedule,
a stage without layers, tp x pp and the 8-rank tp x pp x dp with the sharded optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict, resolve
from yuanlfa.layout import build_layout
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh, parallelize
from yuanlfa.parallel.pp.build import build_runner
from yuanlfa.parallel.pp.tied import sync_tied_embedding_grads
from yuanlfa.train import train

STEPS = 20
MODEL = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 256}


def _batch(micro: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (micro * 4, seq + 1), generator=gen)
    # Two documents per sample, position ids restarting at the second, as packing produces.
    position_ids = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])
    mask = (torch.rand(micro * 4, seq, generator=gen) > 0.1).float()
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": position_ids.expand(micro * 4, seq).contiguous(),
        "loss_mask": mask,
    }


def _reference_grads(cfg, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model = create_model(cfg.model, seed=cfg.train.seed)
    num_tokens = batch["loss_mask"].sum()
    total = 0.0
    for i in range(4):  # the same 4 microbatches the pipeline runs
        part = {k: v[i * 2 : (i + 1) * 2] for k, v in batch.items()}
        losses = model(part["tokens"], part["position_ids"], labels=part["labels"])
        loss = (losses * part["loss_mask"]).sum() / num_tokens
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _config(parallel: dict):
    train = {"micro_batch_size": 2, "seq_length": 16}
    return config_from_dict({"model": MODEL, "parallel": parallel, "train": train})


def _pipeline_grads(rank: int, world: int, parallel: dict):
    cfg = resolve(_config(parallel), world)
    mesh = build_mesh(cfg.parallel, world, rank, cfg.model)
    layout = build_layout(cfg.parallel, cfg.model)
    device = torch.device("cpu")
    model = parallelize(cfg, mesh, device, layout)
    runner = build_runner(cfg, mesh, model, layout, device, num_microbatches=4)
    batch = _batch(2, 16, MODEL["vocab_size"])
    loss = runner.train_step(batch, batch["loss_mask"].sum())
    assert runner.busy_s > 0  # the stage's compute time was recorded
    sync_tied_embedding_grads(model, mesh)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return (None if loss is None else float(loss)), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel",
    [
        {"pp": 2, "pipeline_blocks": [1, 3], "schedule": "1f1b"},
        {"pp": 2, "pipeline_blocks": [3, 1], "schedule": "gpipe"},
        {"pp": 2, "virtual_stages": 2, "pipeline_blocks": [0, 2, 1, 1], "schedule": "zero_bubble"},
        # V-shaped: rank 0 holds stages 0 and 3 (the embedding and the tied head), rank 1 the
        # turn (stages 1 and 2, passing activations locally).
        {"pp": 2, "virtual_stages": 2, "pipeline_blocks": [1, 2, 1, 0], "schedule": "zbv"},
        {"pp": 2, "virtual_stages": 2, "pipeline_blocks": [0, 1, 2, 1], "schedule": "dualpipev"},
    ],
    ids=lambda parallel: parallel["schedule"],
)
def test_pipeline_gradients_equal_one_process(parallel: dict) -> None:
    cfg = _config({})
    ref_loss, ref_grads = _reference_grads(cfg, _batch(2, 16, MODEL["vocab_size"]))
    results = run_distributed(_pipeline_grads, 2, parallel, timeout=300)
    seen: set[str] = set()
    losses = [loss for loss, _ in results if loss is not None]
    assert losses == [pytest.approx(ref_loss, rel=1e-6)]  # on the one rank holding the last stage
    for _, grads in results:
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
            seen.add(name)
    # Every parameter of the model lives on some stage (the embedding on both ends).
    assert seen == set(ref_grads)


def _train(corpus: str, **parallel: object) -> list[tuple[float, float, float | None]]:
    train_keys = ("distributed", "recompute_stages")
    extra = {f"parallel__{k}": v for k, v in parallel.items() if k not in train_keys}
    if "recompute_stages" in parallel:
        extra["train__recompute_stages"] = parallel["recompute_stages"]
    cfg = tiny_overrides(
        corpus,
        model__num_layers=4,
        train__steps=STEPS,
        train__micro_batch_size=1,  # 8 microbatches per step (4 per rank at dp 2)
        train__eval_interval=10,
        optim__clip_grad=0.5,
        optim__distributed=bool(parallel.get("distributed", False)),
        **extra,
    )
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in records]


LAYOUTS = {
    2: {
        "pp2 [1,3] 1f1b": {"pp": 2, "pipeline_blocks": [1, 3]},
        "pp2 [3,1] gpipe": {"pp": 2, "pipeline_blocks": [3, 1], "schedule": "gpipe"},
        "pp2 layout string": {"pp": 2, "pipeline_layout": "Et|tttL"},
        "pp2 balancer's split": {"pp": 2, "pipeline_blocks": "auto"},
        "pp2 v2 [1,2,0,1] interleaved": {
            "pp": 2,
            "virtual_stages": 2,
            "pipeline_blocks": [1, 2, 0, 1],
            "schedule": "interleaved_1f1b",
        },
        "pp2 v2 zero bubble": {"pp": 2, "virtual_stages": 2, "schedule": "zero_bubble"},
        # V-shaped: the embedding and the tied head both on rank 0.
        "pp2 v2 [1,2,1,0] zbv": {
            "pp": 2,
            "virtual_stages": 2,
            "pipeline_blocks": [1, 2, 1, 0],
            "schedule": "zbv",
        },
        "pp2 v2 [0,1,2,1] dualpipev": {
            "pp": 2,
            "virtual_stages": 2,
            "pipeline_blocks": [0, 1, 2, 1],
            "schedule": "dualpipev",
        },
    },
    4: {
        "pp4 [1,1,2,0] head-only last stage, recompute per stage": {
            "pp": 4,
            "pipeline_blocks": [1, 1, 2, 0],
            "recompute_stages": ["full", "selective", "none", "none"],
        },
        "tp2 x pp2 [3,1] + sp": {
            "tp": 2,
            "pp": 2,
            "pipeline_blocks": [3, 1],
            "sequence_parallel": True,
        },
        "tp2 x pp2 v2 [1,1,2,0] zbv + sp": {
            "tp": 2,
            "pp": 2,
            "virtual_stages": 2,
            "pipeline_blocks": [1, 1, 2, 0],
            "schedule": "zbv",
            "sequence_parallel": True,
        },
        "pp2 v2 [2,1,1,0] dualpipev x dp2, reduced after backward": {
            "pp": 2,
            "virtual_stages": 2,
            "pipeline_blocks": [2, 1, 1, 0],
            "schedule": "dualpipev",
            "overlap_grad_reduce": False,
        },
    },
    8: {
        "tp2 x pp2 [1,3] x dp2 + sp + zero1, small gradient buckets": {
            "tp": 2,
            "pp": 2,
            "pipeline_blocks": [1, 3],
            "sequence_parallel": True,
            "distributed": True,
            "grad_bucket_size": 20000,  # several buckets per stage, reduced during backward
        },
    },
}


def _layouts(rank: int, world: int, corpus: str) -> dict[str, list]:
    runs = {name: _train(corpus, **parallel) for name, parallel in LAYOUTS[world].items()}
    dist.barrier()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 8])
def test_pipeline_training_equals_one_process(small_corpus: str, world: int) -> None:
    single = _train(small_corpus)
    assert single[0][1] > 0.5  # clipping is active
    assert single[9][2] is not None and single[-1][2] is not None
    for rank_result in run_distributed(_layouts, world, small_corpus, timeout=900):
        for name, run in rank_result.items():
            assert len(run) == STEPS, name
            for step, (got, ref) in enumerate(zip(run, single, strict=True)):
                assert got[0] == pytest.approx(ref[0], rel=1e-5), (name, step)
                assert got[1] == pytest.approx(ref[1], rel=1e-4), (name, step)
                if ref[2] is not None:
                    assert got[2] == pytest.approx(ref[2], rel=1e-5), (name, step)
