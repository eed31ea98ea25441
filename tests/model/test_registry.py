"""The research API on one process: registry errors, the paper's filter variants, plug-ins loaded
from a user's file, decoding and initialization of any filter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.model.plugin_source import write_plugin
from tests.model.test_model import model_cfg, randomize
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.model import (
    InferenceCache,
    RegistryError,
    create_model,
    name_seed,
    register_attention,
    register_filter,
    registered_attentions,
    registered_filters,
)
from yuanlfa.model.registry import check_model_config, get_entry

H = 64


@pytest.fixture
def plugin_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A user's plug-in file outside the package (tests/model/plugin_source.py)."""
    return write_plugin(tmp_path_factory.mktemp("user_plugins"))


def _error(model: dict) -> str:
    """The message a config gets on load, or where the model is built from it (plug-ins and
    registered names are checked by the registry, which the config does not import)."""
    with pytest.raises(ConfigError) as info:
        check_model_config(config_from_dict({"model": model}).model)
    return str(info.value)


def test_unknown_names_list_registered_and_suggest() -> None:
    message = _error({"filter": "lfa_nonorm"})
    assert "model.filter" in message and "'lfa_no_norm'" in message
    for name in ("lfa", "lfa_no_norm", "conv", "none"):
        assert name in message
    assert "model.attention" in _error({"attention": "casual"})
    assert "did you mean 'causal'" in _error({"attention": "casual"})


def test_plugin_files_and_modules_that_do_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    assert "not found" in _error({"plugins": [str(missing)]})
    assert "no module 'no_such_plugin_mod'" in _error({"plugins": ["no_such_plugin_mod"]})
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert "importing" in _error({"plugins": [str(broken)]})


def test_lfa_false_means_no_filter() -> None:
    assert model_cfg(1, lfa=False).filter_name == "none"
    assert "model.lfa: false" in _error({"lfa": False, "filter": "conv"})
    names = [n for n, _ in create_model(model_cfg(1, lfa=False), seed=1).named_parameters()]
    assert names == [n for n, _ in create_model(model_cfg(1, filter="none"), 1).named_parameters()]
    assert not any("lf_gate" in n for n in names)
    assert "kernel 2" in _error({"filter": "lfa", "filter_kernel": 3})


class _Good(nn.Module):
    receptive_field = 0

    def __init__(self, cfg) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x, doc_start=None):
        return x * self.scale


def test_plugin_classes_missing_parts_are_named() -> None:
    class NoField(nn.Module):
        def forward(self, x, doc_start=None):
            return x

    with pytest.raises(RegistryError, match="does not declare receptive_field"):
        register_filter("t_nofield")(NoField)

    class NoDocStart(_Good):
        def forward(self, x):
            return x

    with pytest.raises(RegistryError, match="lacks a doc_start parameter"):
        register_filter("t_nodoc")(NoDocStart)

    class TwoInputs(nn.Module):
        def forward(self, q, k, doc_start=None):
            return q

    with pytest.raises(RegistryError, match="needs 3"):
        register_attention("t_two")(TwoInputs)

    class BadPlan(_Good):
        tp_plan = {"scale": "rows"}

    with pytest.raises(RegistryError, match="not a style"):
        register_filter("t_badplan")(BadPlan)

    with pytest.raises(RegistryError, match="torch.nn.Module"):
        register_filter("t_func")(lambda x: x)

    class NoForward(nn.Module):
        receptive_field = 0

    with pytest.raises(RegistryError, match="has no forward"):
        register_filter("t_noforward")(NoForward)

    class TwoArgs(_Good):
        def __init__(self, cfg, width) -> None:
            super().__init__(cfg)

    with pytest.raises(RegistryError, match="builds it as cls.cfg."):
        register_filter("t_twoargs")(TwoArgs)
    with pytest.raises(RegistryError, match="'none' means no filter"):
        register_filter("none")(_Good)


def test_names_are_not_silently_replaced() -> None:
    register_filter("t_good")(_Good)
    register_filter("t_good")(_Good)  # the same class again (a re-imported file) is fine

    class Other(_Good):
        pass

    with pytest.raises(RegistryError, match="already registered"):
        register_filter("t_good")(Other)
    with pytest.raises(RegistryError, match="already registered"):
        register_filter("lfa")(Other)
    register_filter("t_good", override=True)(Other)
    assert get_entry("filter", "t_good").cls is Other


def test_zero_dim_parameters_are_refused() -> None:
    class Scalar(_Good):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.alpha = nn.Parameter(torch.tensor(1.0))

    register_filter("t_scalar")(Scalar)
    with pytest.raises(RegistryError, match="'alpha' is 0-dimensional"):
        create_model(model_cfg(1, filter="t_scalar"), seed=1)


def filter_params(name: str, h: int, kernel: int) -> int:
    """Parameters per layer of each variant, from its definition (docs/yuan2_facts.md for LFA)."""
    lfa_convs = (h // 2 * h * 2 + h // 2) + (h * (h // 2) * 2 + h)
    return {
        "lfa": lfa_convs + h,  # + RMSNorm weight
        "lfa_no_norm": lfa_convs,
        "conv": h * h * kernel + h + h,  # weight, bias, RMSNorm weight
        "none": 0,
    }[name]


VARIANTS = [("lfa", 2), ("lfa_no_norm", 2), ("conv", 1), ("conv", 2), ("conv", 3), ("conv", 7)]


@pytest.mark.parametrize("name, kernel", [*VARIANTS, ("none", 2)])
def test_variant_shapes_and_parameter_counts(name: str, kernel: int) -> None:
    assert name in registered_filters() and "causal" in registered_attentions()
    cfg = model_cfg(2, filter=name, filter_kernel=kernel)
    model = create_model(cfg, seed=3)
    base = create_model(model_cfg(2, filter="none"), seed=3)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == cfg.num_layers * filter_params(name, H, kernel)
    ids = torch.randint(0, 128, (3, 11))
    assert model(ids).shape == (3, 11, 128)
    gate = model.layers["0"].attn.lf_gate
    if gate is not None:
        x = torch.randn(11, 3, H)
        out = gate(x)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == x.shape


def _old_lfa_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The LFA rule of the model before the registry existed (kept here as the golden one)."""
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return out.fill_(1.0)
    in_channels = H if ".conv1." in name else H // 2
    bound = 1.0 / math.sqrt(in_channels * 2)
    return out.uniform_(-bound, bound, generator=gen)


def test_lfa_variant_is_the_default_model() -> None:
    default = create_model(model_cfg(2), seed=5)
    named = create_model(model_cfg(2, filter="lfa", attention="causal"), seed=5)
    assert default.state_dict().keys() == named.state_dict().keys()
    for (name, p), q in zip(default.named_parameters(), named.parameters()):
        assert torch.equal(p, q), name
        if ".lf_gate." in name:
            assert torch.equal(p, _old_lfa_init(name, tuple(p.shape), 5)), name
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(default(ids), named(ids))


DECODED = [
    *VARIANTS,
    ("test_gated_taps", 2),
    ("test_taps", 2),
    ("test_running_mean", 2),
]


@pytest.mark.parametrize("name, kernel", DECODED)
@pytest.mark.parametrize("reset", [False, True])
@torch.no_grad()
def test_cached_decoding_of_any_filter(plugin_file: str, name: str, kernel: int, reset: bool):
    cfg = model_cfg(
        2, filter=name, filter_kernel=kernel, plugins=[plugin_file], lfa_reset_at_doc_start=reset
    )
    model = create_model(cfg, seed=11).eval()
    randomize(model, seed=12)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    # A second document starts at position 4 of the prompt (exercised with reset=True).
    pos = torch.cat([torch.arange(4), torch.arange(8)]).expand(2, 12)
    full = model(ids, pos)
    cache = InferenceCache()
    steps = [model(ids[:, :6], pos[:, :6], cache=cache)]
    steps += [model(ids[:, t : t + 1], pos[:, t : t + 1], cache=cache) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_plugin_init_depends_on_seed_and_name_only(plugin_file: str) -> None:
    cfg = model_cfg(2, filter="test_gated_taps", attention="test_scaled", plugins=[plugin_file])
    a, b = create_model(cfg, seed=3), create_model(cfg, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    taps0, taps1 = a.layers["0"].attn.lf_gate.taps, a.layers["1"].attn.lf_gate.taps
    assert not torch.equal(taps0, taps1)  # per module name, not one draw for all layers
    assert not torch.equal(taps0, create_model(cfg, seed=4).layers["0"].attn.lf_gate.taps)
    # The constructor's own rule: torch.rand(heads) + 0.5.
    scale = a.layers["0"].attn.core.head_scale
    assert scale.shape == (4,) and bool(((scale >= 0.5) & (scale < 1.5)).all())
    # torch's global generator is untouched by building.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    create_model(cfg, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_plugin_from_yaml_trains_a_step(plugin_file: str, tmp_path: Path) -> None:
    """A config file naming the plug-in: strict loading, the model built, one backward."""
    from yuanlfa.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(
        "model:\n  num_layers: 1\n  hidden_size: 64\n  num_heads: 4\n  vocab_size: 128\n"
        f"  filter: test_gated_taps\n  attention: test_scaled\n  plugins: [{plugin_file}]\n"
    )
    cfg = load_config(path)
    model = create_model(cfg.model, seed=1)
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.0.attn.lf_gate.taps"].abs().sum() > 0
    assert grads["layers.0.attn.core.temperature"].abs().sum() > 0
