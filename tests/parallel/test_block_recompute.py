"""Megatron's ``block`` recompute method (train.recompute_method: block): only the first
train.recompute_num_layers layers of each pipeline stage are checkpointed.

Training with it gives the losses of training without recompute (bit for bit: recompute repeats
the same forward); the layers it wraps are the first N of each stage; the activations a stage
really keeps (autograd's saved tensors, measured through a pipeline step) are within 10% of the
planner's prediction, which lies strictly between no recompute and full recompute.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.parallel.test_activation_memory import MICRO, MICROBATCHES, SEQ
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict, resolve
from yuanlfa.layout import build_layout
from yuanlfa.parallel import build_mesh, parallelize
from yuanlfa.parallel.pp.build import build_runner
from yuanlfa.parallel.recompute import recomputed_layers
from yuanlfa.planner.activations import stage_activation_bytes
from yuanlfa.train import train
from yuanlfa.train.activation_probe import SavedActivationProbe


def test_block_wraps_the_first_layers_of_each_stage() -> None:
    stages = [[0, 1, 2], [3, 4, 5, 6]]
    assert recomputed_layers(range(7), "block", 2, stages) == [0, 1, 3, 4]
    assert recomputed_layers(range(7), "block", 5, stages) == [0, 1, 2, 3, 4, 5, 6]
    assert recomputed_layers(range(7), "uniform", 1, stages) == list(range(7))


@pytest.mark.slow
def test_block_recompute_trains_as_no_recompute(small_corpus: str) -> None:
    def losses(**extra) -> list[float]:
        cfg = tiny_overrides(small_corpus, train__steps=4, model__num_layers=3, **extra)
        return [r["loss"] for r in train(config_from_dict(cfg), progress=False).records]

    plain = losses()
    assert losses(train__recompute="full", train__recompute_method="block") == plain
    block2 = losses(
        train__recompute="full", train__recompute_method="block", train__recompute_num_layers=2
    )
    assert block2 == plain


def _config(recompute: str, method: str = "uniform", layers: int = 1):
    return config_from_dict(
        {
            "model": {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "vocab_size": 256},
            "parallel": {"pp": 2, "pipeline_blocks": [3, 3], "schedule": "1f1b"},
            "train": {
                "micro_batch_size": MICRO,
                "global_batch_size": MICRO * MICROBATCHES,
                "seq_length": SEQ,
                "precision": "fp32",
                "device": "cpu",
                "recompute": recompute,
                "recompute_method": method,
                "recompute_num_layers": layers,
            },
        }
    )


def _measure(rank: int, world: int, layers: int) -> tuple[int, int]:
    cfg = resolve(_config("full", "block", layers), world)
    mesh = build_mesh(cfg.parallel, world, rank, cfg.model)
    layout = build_layout(cfg.parallel, cfg.model)
    device = torch.device("cpu")
    model = parallelize(cfg, mesh, device, layout)
    runner = build_runner(cfg, mesh, model, layout, device, MICROBATCHES)
    gen = torch.Generator().manual_seed(0)
    n = MICRO * MICROBATCHES
    tokens = torch.randint(0, 256, (n, SEQ + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).expand(n, SEQ),
        "loss_mask": torch.ones(n, SEQ),
    }
    with SavedActivationProbe([*model.parameters(), *batch.values()]) as probe:
        runner.train_step(batch, batch["loss_mask"].sum())
    predicted = stage_activation_bytes(cfg, layout, mesh.pp_rank)
    return probe.peak, predicted


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 2])
def test_block_activations_match_the_planner(layers: int) -> None:
    results = run_distributed(_measure, 2, layers, timeout=300)
    for rank, (measured, predicted) in enumerate(results):
        assert predicted == pytest.approx(measured, rel=0.10), (rank, measured, predicted)
        layout = build_layout(_config("none").parallel, _config("none").model)
        none = stage_activation_bytes(resolve(_config("none"), 2), layout, rank)
        full = stage_activation_bytes(resolve(_config("full"), 2), layout, rank)
        assert full < predicted < none, (rank, full, predicted, none)


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"recompute_num_layers": 0}, "train.recompute_num_layers: must be >= 1"),
        ({"recompute_method": "uniform", "recompute_num_layers": 2}, "recompute_method: block"),
        ({"recompute_method": "blocks"}, "recompute_method"),
    ],
)
def test_bad_recompute_settings_name_the_fix(train: dict, needle: str) -> None:
    from yuanlfa.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"train": train})
