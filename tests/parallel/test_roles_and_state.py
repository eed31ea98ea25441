"""The explicit protocols of parallel/: parameter roles survive materialization, the tp plan table
names real modules, and both optimizers describe their state to checkpoints the same way."""

from __future__ import annotations

import torch
from torch import nn

from yuanlfa.config import ModelConfig, OptimConfig
from yuanlfa.model import build_model, create_model, materialize
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.parallel.optim_state import checkpoint_state
from yuanlfa.parallel.roles import ParamRole, is_sharded, role_of, set_role
from yuanlfa.parallel.tp.plan import LAYER_PLAN, style_of
from yuanlfa.train.optimizer import build_optimizer

CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, vocab_size=64)


def test_roles_survive_materialize() -> None:
    model = build_model(CFG)
    set_role(model.embed.weight, tp_sharded=True)
    materialize(model, CFG, seed=1)
    assert model.embed.weight.device.type == "cpu"
    assert role_of(model.embed.weight) == ParamRole(tp_sharded=True)
    assert not is_sharded(model.final_norm.weight)


def test_plan_table_names_linear_layers() -> None:
    model = build_model(CFG)
    for path in LAYER_PLAN:
        assert type(model.layers["0"].get_submodule(path)) is nn.Linear
        assert style_of(f"layers.1.{path}.weight") is LAYER_PLAN[path]
    assert style_of("layers.1.input_norm.weight") is None
    assert style_of("embed.weight") is not None


def _covered(optimizer) -> dict[str, int]:
    state = checkpoint_state(optimizer)
    state.prepare(0)
    covered: dict[int, int] = {}
    for piece in state.pieces():
        assert piece.exp_avg.numel() == piece.stop - piece.start == piece.exp_avg_sq.numel()
        covered[id(piece.param)] = covered.get(id(piece.param), 0) + piece.stop - piece.start
    return covered


def test_both_optimizers_describe_every_element_once() -> None:
    for dtype, make in (
        (torch.float32, lambda m: build_optimizer(m, OptimConfig())),
        (torch.bfloat16, lambda m: ShardedAdamW(m, OptimConfig(), None)),
    ):
        model = create_model(CFG, seed=1, dtype=dtype)
        covered = _covered(make(model))
        assert covered == {id(p): p.numel() for p in model.parameters()}
