"""Every filter and core attention is costed as it declares, not as LFA: parameters equal to the
built model's, activations against the bytes autograd saves (one process, tp 2, tp 2 + sp),
FLOPs and tp communication; plug-ins with and without a declaration."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.model.plugin_source import write_plugin
from tests.planner.declared_plugin import write_declared_plugin
from tests.planner.test_activations import _model_cfg, _spec, measure, saved_bytes
from yuanlfa.cli import info
from yuanlfa.cli.plugin_costs import load_plugin_costs
from yuanlfa.config import ConfigError, ModelConfig, config_from_dict
from yuanlfa.model import build_model, create_model
from yuanlfa.model.registry import split_dim
from yuanlfa.parallel.recompute import apply_recompute
from yuanlfa.planner import (
    ComponentCost,
    declare_cost,
    flops_per_token,
    param_counts,
    unknown_costs,
)
from yuanlfa.planner.activations import microbatch_activations
from yuanlfa.planner.comm import layer_tp_s
from yuanlfa.planner.links import Link, ring_all_gather_s

BUILTIN = [
    {"filter": "lfa_no_norm"},
    {"filter": "conv", "filter_kernel": 3},
    {"filter": "conv", "filter_kernel": 1},
    {"filter": "none"},
]
DECLARED = [
    {"filter": "test_declared_taps"},
    {"filter": "test_declared_gate"},
    {"attention": "test_declared_scaled"},
]
MODES = ("none", "selective", "full")
BUILTIN_TOLERANCE = 0.01  # the LFA tests' (tests/planner/test_activations.py)
PLUGIN_TOLERANCE = 0.10  # a plug-in's own declaration: the acceptance bound
SHARDED = ("qk_proj.weight", "v_proj.weight", "o_proj.weight", "fc1.weight", "fc2.weight")


def _ids(extra: dict) -> str:
    return "-".join(f"{v}" for v in extra.values())


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> str:
    return write_declared_plugin(tmp_path_factory.mktemp("declared"))


@pytest.fixture(scope="module")
def undeclared(tmp_path_factory) -> str:
    return write_plugin(tmp_path_factory.mktemp("undeclared"))


def _variant(extra: dict, plugin: str | None = None, layers: int = 2, **more) -> ModelConfig:
    plugins = {"plugins": [plugin]} if plugin else {}
    cfg = _model_cfg(64, 4, layers, **extra, **plugins, **more)
    load_plugin_costs(cfg)
    return cfg


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_params(cfg: ModelConfig) -> None:
    counts = param_counts(cfg)
    model = build_model(cfg)
    assert counts.total == _count(model)
    layer = model.layers["1"]
    assert counts.per_layer == _count(layer)
    gate = layer.attn.lf_gate
    assert counts.lfa_per_layer == (_count(gate) if gate is not None else 0)
    assert counts.attention_per_layer == _count(layer.attn.core)
    sharded = sum(
        p.numel()
        for name, p in layer.named_parameters()
        if name.endswith(SHARDED) or split_dim(f"layers.1.{name}", cfg) is not None
    )
    assert counts.per_layer_sharded == sharded
    assert counts.per_layer_replicated == counts.per_layer - sharded


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("extra", BUILTIN, ids=_ids)
def test_builtin_params_match_model(extra: dict, tie: bool) -> None:
    _check_params(_variant(extra, tie_embeddings=tie))


@pytest.mark.parametrize("extra", DECLARED, ids=_ids)
def test_declared_plugin_params_match_model(extra: dict, declared: str) -> None:
    _check_params(_variant(extra, declared))
    assert unknown_costs(_variant(extra, declared)) == []


@pytest.mark.parametrize(
    "extra", [{"filter": "test_gated_taps"}, {"attention": "test_scaled"}], ids=_ids
)
def test_undeclared_plugin_params_from_the_module(extra: dict, undeclared: str, capsys) -> None:
    cfg = _variant(extra, undeclared)
    _check_params(cfg)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "saved_bytes" in warnings[0] and "cost=" in warnings[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "extra", [*BUILTIN, {"filter": "conv", "filter_kernel": 3, "lfa_reset_at_doc_start": True}]
)
def test_builtin_activations(extra: dict, dtype: torch.dtype, mode: str) -> None:
    cfg = _variant(extra)
    predicted = microbatch_activations(cfg, _spec(48, 3, mode, dtype), 2, True, True).saved
    measured = measure(cfg, 48, 3, mode, dtype)
    assert abs(predicted - measured) <= BUILTIN_TOLERANCE * measured, (predicted, measured)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("extra", DECLARED, ids=_ids)
def test_declared_plugin_activations(extra: dict, mode: str, declared: str) -> None:
    cfg = _variant(extra, declared)
    predicted = microbatch_activations(cfg, _spec(48, 3, mode), 2, True, True).saved
    measured = measure(cfg, 48, 3, mode)
    assert abs(predicted - measured) <= PLUGIN_TOLERANCE * measured, (predicted, measured)


def _tp_worker(rank: int, world: int, plugin: str, cases: list) -> list[tuple[int, int]]:
    import torch.distributed as dist

    from yuanlfa.parallel import apply_tensor_parallel

    out = []
    for extra, sp, mode in cases:
        cfg = _variant(extra, plugin if extra.get("filter", "").startswith("test_") or
                       extra.get("attention", "").startswith("test_") else None)  # fmt: skip
        model = create_model(cfg, seed=0)
        model = apply_tensor_parallel(model, dist.group.WORLD, sp, cfg.loss_block_size)
        model = apply_recompute(model, mode)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (2, 32), generator=g)
        labels = torch.randint(0, 256, (2, 32), generator=g)
        positions = torch.arange(32).expand(2, 32)
        measured = saved_bytes(model, functools.partial(model, ids, positions, labels=labels))
        spec = dataclasses.replace(_spec(32, 2, mode), tp=world, sequence_parallel=sp)
        out.append((measured, microbatch_activations(cfg, spec, 2, True, True).saved))
    return out


def test_tensor_and_sequence_parallel(declared: str) -> None:
    """As the LFA test (tests/planner/test_activations.py) for every other variant."""
    cases = [(extra, sp, "none") for extra in BUILTIN + DECLARED for sp in (False, True)]
    cases += [({"filter": "conv", "filter_kernel": 3}, True, "selective")]
    results = run_distributed(_tp_worker, 2, declared, cases)
    for case, per_rank in zip(cases, zip(*results)):
        # Rank 0 of a sequence-parallel group has no halo to keep: the formula is the maximum.
        measured = max(m for m, _ in per_rank)
        predicted = per_rank[0][1]
        plugin = any(str(v).startswith("test_") for v in case[0].values())
        tolerance = PLUGIN_TOLERANCE if plugin else BUILTIN_TOLERANCE
        assert abs(predicted - measured) <= tolerance * measured, (case, predicted, measured)


def test_flops_follow_the_filter(declared: str) -> None:
    h, layers = 64, 2
    lfa = flops_per_token(_variant({"filter": "lfa"}), 32)
    conv = flops_per_token(_variant({"filter": "conv", "filter_kernel": 3}), 32)
    none = flops_per_token(_variant({"filter": "none"}), 32)
    assert conv["lfa"] == layers * 2 * 3 * h * h
    assert none["lfa"] == 0 and lfa["lfa"] == layers * 4 * h * h
    assert flops_per_token(_variant({"filter": "lfa_no_norm"}), 32)["lfa"] == lfa["lfa"]
    gate = flops_per_token(_variant({"filter": "test_declared_gate"}, declared), 32)
    assert gate["lfa"] == layers * 8 * h * h
    assert none["forward"] == lfa["forward"] - lfa["lfa"]


def test_tp_communication_follows_the_filter(declared: str) -> None:
    link = Link(10.0, 1e-5)
    spec = dataclasses.replace(_spec(32, 2, "none"), tp=2, sequence_parallel=True)

    def comm(cfg: ModelConfig, sp: bool = True) -> tuple[float, float]:
        return layer_tp_s(cfg, dataclasses.replace(spec, sequence_parallel=sp), sp, link)

    none = comm(_variant({"filter": "none"}))
    pointwise = comm(_variant({"filter": "conv", "filter_kernel": 1}))
    conv3 = comm(_variant({"filter": "conv", "filter_kernel": 3}))
    assert pointwise == none  # no halo
    halo = ring_all_gather_s(2 * 2 * spec.micro_batch * 64 * 4, 2, link)  # 2 rows per rank
    assert conv3[0] == pytest.approx(none[0] + halo) and conv3[1] == pytest.approx(none[1] + halo)
    # A filter reading the whole sequence gathers it (and reduce-scatters its gradient).
    declare_cost("filter", "test_whole_sequence", lambda cfg: ComponentCost(0, halo_tokens=None))
    whole = comm(dataclasses.replace(_variant({"filter": "none"}), filter="test_whole_sequence"))
    assert whole[0] > none[0] and whole[1] > none[1]
    # Its own column- and row-parallel layers add their collectives, with or without SP.
    gate = _variant({"filter": "test_declared_gate"}, declared)
    for sp in (False, True):
        plain, extra = comm(_variant({"filter": "none"}), sp), comm(gate, sp)
        assert extra[0] > plain[0] and extra[1] > plain[1]


def _info_json(tmp_path: Path, model: dict, capsys) -> tuple[dict, str]:
    path = tmp_path / "cfg.yaml"
    base = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256}
    path.write_text(json.dumps({"model": {**base, **model}}))  # JSON is YAML
    assert info.main(["--config", str(path), "--json"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


@pytest.mark.parametrize(
    "model", [{"filter": "conv", "filter_kernel": 3}, {"filter": "lfa_no_norm"}, {"filter": "none"}]
)
def test_info_reports_the_built_models_params(model: dict, tmp_path: Path, capsys) -> None:
    got, err = _info_json(tmp_path, model, capsys)
    cfg = _written_model(tmp_path / "cfg.yaml")
    assert got["params_total"] == _count(build_model(cfg))
    assert got["filter"] == model["filter"] and got["unknown_costs"] == [] and err == ""


def _written_model(path: Path) -> ModelConfig:
    return config_from_dict({"model": json.loads(path.read_text())["model"]}).model


def test_info_with_plugins(tmp_path: Path, declared: str, undeclared: str, capsys) -> None:
    got, err = _info_json(tmp_path, {"plugins": [declared], "filter": "test_declared_gate"}, capsys)
    cfg = _written_model(tmp_path / "cfg.yaml")
    assert got["params_total"] == _count(build_model(cfg)) and err == ""
    got, err = _info_json(
        tmp_path,
        {"plugins": [undeclared], "filter": "test_taps", "attention": "test_scaled"},
        capsys,
    )
    cfg = _written_model(tmp_path / "cfg.yaml")
    assert got["params_total"] == _count(build_model(cfg))
    assert len(got["unknown_costs"]) == 2
    assert len(err.strip().splitlines()) == 2 and "test_taps" in err and "test_scaled" in err


def test_costing_a_plugin_without_torch_says_so(declared: str, monkeypatch) -> None:
    cfg = _model_cfg(64, 4, 2)
    cfg = dataclasses.replace(cfg, filter="test_declared_taps", plugins=(declared,))
    monkeypatch.setitem(sys.modules, "yuanlfa.model.registry", None)  # import fails
    with pytest.raises(ConfigError, match="needs torch"):
        load_plugin_costs(cfg)


def test_unknown_plugin_is_never_costed_as_lfa() -> None:
    cfg = dataclasses.replace(_model_cfg(64, 4, 2), filter="nobody_declared_this")
    with pytest.raises(ConfigError, match="nobody_declared_this"):
        param_counts(cfg)


def _plan_json(tmp_path: Path, model: dict, capsys, *args: str) -> tuple[dict, str]:
    from yuanlfa.cli.plan import main

    path = tmp_path / "plan.yaml"
    base = {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 256}
    cfg = {"model": {**base, **model}, "parallel": {"pp": 2}, "train": {"seq_length": 32}}
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path), "--json", *args]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


@pytest.mark.parametrize(
    "model",
    [{"filter": "conv", "filter_kernel": 3}, {"filter": "none"}, {"filter": "test_declared_gate"}],
    ids=_ids,
)
def test_plan_weighs_the_built_model(model: dict, tmp_path: Path, declared: str, capsys) -> None:
    """yuanlfa-plan's per-rank weights hold the built model's parameters (plus the last stage's
    copy of the tied embedding)."""
    if model["filter"].startswith("test_"):
        model = {**model, "plugins": [declared]}
    out, err = _plan_json(tmp_path, model, capsys)
    cfg = _written_model(tmp_path / "plan.yaml")
    built = build_model(cfg)
    weights = sum(s["weights_bytes"] for s in out["released"]["stages"])
    assert weights == 4 * (_count(built) + cfg.vocab_size * cfg.hidden_size)  # fp32 weights
    assert err == ""


def test_plan_and_advise_warn_about_undeclared_costs(
    tmp_path: Path, undeclared: str, capsys
) -> None:
    model = {"plugins": [undeclared], "filter": "test_taps"}
    _, err = _plan_json(tmp_path, model, capsys)
    assert err.count("warning: ") == 1 and "test_taps" in err
    advice, err = _plan_json(
        tmp_path, model, capsys, "--advise", "--nodes", "1", "--gpus-per-node", "2",
        "--intra-bw", "100",
    )  # fmt: skip
    assert err.count("warning: ") == 1 and advice


def test_registry_keeps_a_cost_declaration() -> None:
    from torch import nn

    from yuanlfa.model.registry import RegistryError, get_entry, register_filter

    def cost(cfg: ModelConfig) -> ComponentCost:
        return ComponentCost(params=cfg.hidden_size, saved_bytes=lambda spec: 0)

    class Scale(nn.Module):
        receptive_field = 0

        def __init__(self, cfg) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(cfg.hidden_size))

        def forward(self, x, doc_start=None):
            return x * self.w

    register_filter("t_cost_arg", cost=cost)(Scale)
    assert get_entry("filter", "t_cost_arg").cost is cost

    class Attribute(Scale):
        pass

    Attribute.cost = staticmethod(cost)
    register_filter("t_cost_attr")(Attribute)
    assert get_entry("filter", "t_cost_attr").cost is cost
    assert get_entry("filter", "lfa").cost is None  # built-ins are declared by the planner

    class NotCallable(Scale):
        cost = 3

    with pytest.raises(RegistryError, match="cost attribute must be a callable"):
        register_filter("t_cost_bad")(NotCallable)
    with pytest.raises(RegistryError, match="cost must be a callable"):
        register_filter("t_cost_bad", cost=3)(Scale)
    cfg = dataclasses.replace(_model_cfg(64, 4, 2), filter="t_cost_arg")
    load_plugin_costs(cfg)
    assert param_counts(cfg).lfa_per_layer == 64
