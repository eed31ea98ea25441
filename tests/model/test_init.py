"""Layout-independent initialization: values depend only on (seed, global parameter name)."""

from __future__ import annotations

import math

import pytest
import torch

from yuanlfa.config import ModelConfig, config_from_dict, resolve
from yuanlfa.model import YuanModel, build_model, create_model, materialize
from yuanlfa.model.norm import RMSNorm


def model_cfg(num_layers: int = 4, hidden: int = 64, **model: object) -> ModelConfig:
    data = {"num_layers": num_layers, "hidden_size": hidden, "num_heads": 4, "vocab_size": 128}
    data.update(model)
    return resolve(config_from_dict({"model": data}), world_size=1).model


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.mark.parametrize(
    ("layer_ids", "has_embedding", "has_head"),
    [([2, 3], False, False), ([2, 3], False, True), ([0, 1], True, False), ([1, 3], True, True)],
)
def test_stage_values_equal_full_model(
    layer_ids: list[int], has_embedding: bool, has_head: bool
) -> None:
    cfg = model_cfg(4)
    full = params(create_model(cfg, seed=11))
    stage = params(
        create_model(
            cfg, seed=11, layer_ids=layer_ids, has_embedding=has_embedding, has_head=has_head
        )
    )
    # The stage holds exactly its layers (global names) plus what its role needs.
    layer_names = {n for n in stage if n.startswith("layers.")}
    assert {int(n.split(".")[1]) for n in layer_names} == set(layer_ids)
    assert ("final_norm.weight" in stage) == has_head
    assert ("embed.weight" in stage) == (has_embedding or has_head)  # the tied head reads it
    for name, value in stage.items():
        assert torch.equal(value, full[name]), name


def test_stage_built_in_other_order_or_separately() -> None:
    # Materializing layers in a different order (or one at a time) draws the same values:
    # nothing depends on a shared generator's position.
    cfg = model_cfg(4)
    full = params(create_model(cfg, seed=5))
    for ids in ([3, 2], [3], [1]):
        stage = create_model(cfg, seed=5, layer_ids=ids, has_embedding=False, has_head=False)
        for name, value in params(stage).items():
            assert torch.equal(value, full[name]), name


def test_same_seed_same_values_different_seed_different() -> None:
    cfg = model_cfg(2)
    a, b, c = (params(create_model(cfg, seed=s)) for s in (1, 1, 2))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(a[name], c[name]), name


def test_parameters_are_not_copies_of_each_other() -> None:
    # Each name has its own stream: layers must not share values (a seed ignoring the name).
    p = params(create_model(model_cfg(2), seed=3))
    for suffix in ("attn.qk_proj.weight", "mlp.fc1.weight", "attn.lf_gate.conv1.weight"):
        assert not torch.equal(p[f"layers.0.{suffix}"], p[f"layers.1.{suffix}"]), suffix
    # Same shape, different names in one layer.
    assert not torch.equal(p["layers.0.attn.v_proj.weight"], p["layers.0.attn.o_proj.weight"])


def test_materialize_replaces_every_meta_parameter() -> None:
    cfg = model_cfg(2)
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, cfg, seed=4, dtype=torch.float64)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float64, name
        assert torch.isfinite(p).all(), name
    # The dtype does not change the values beyond rounding of the fp32 draw.
    ref = params(create_model(cfg, seed=4))
    for name, p in model.named_parameters():
        assert torch.equal(p.float(), ref[name]), name


def norm_weights(model: YuanModel) -> dict[str, torch.Tensor]:
    """Found by module type, not by name, so that a renamed norm cannot escape the check."""
    out = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    for name, module in model.named_modules():
        if name.endswith("lf_gate"):
            out[f"{name}.norm.weight"] = module.norm.weight
    return out


def test_norm_weights_are_ones() -> None:
    cfg = model_cfg(2)
    model = create_model(cfg, seed=9)
    norms = norm_weights(model)
    # input, post-attention and LFA norm per layer, plus the final norm.
    assert len(norms) == 3 * cfg.num_layers + 1
    for name, w in norms.items():
        assert torch.equal(w, torch.ones(cfg.hidden_size)), name


def std_of(model: YuanModel, suffix: str) -> float:
    values = [p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)]
    return torch.cat(values).std().item()


def test_scaled_init_of_residual_projections() -> None:
    cfg = model_cfg(4, hidden=128, init_std=0.02)
    model = create_model(cfg, seed=1)
    qk = std_of(model, "attn.qk_proj.weight")
    o = std_of(model, "attn.o_proj.weight")
    fc2 = std_of(model, "mlp.fc2.weight")
    assert o < qk and fc2 < qk
    # Megatron's rule: init_std / sqrt(2 * num_layers) for outputs that feed the residual.
    scaled = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert qk == pytest.approx(cfg.init_std, rel=0.03)
    assert std_of(model, "attn.v_proj.weight") == pytest.approx(cfg.init_std, rel=0.03)
    assert std_of(model, "mlp.fc1.weight") == pytest.approx(cfg.init_std, rel=0.03)
    assert std_of(model, "embed.weight") == pytest.approx(cfg.init_std, rel=0.03)
    assert o == pytest.approx(scaled, rel=0.03)
    assert fc2 == pytest.approx(scaled, rel=0.03)


def test_init_std_is_followed() -> None:
    model = create_model(model_cfg(2, init_std=0.1), seed=1)
    assert std_of(model, "attn.qk_proj.weight") == pytest.approx(0.1, rel=0.03)


@pytest.mark.parametrize("hidden", [64, 128])
def test_lfa_conv_init_bounds(hidden: int) -> None:
    cfg = model_cfg(2, hidden=hidden)
    model = create_model(cfg, seed=2)
    for i in range(cfg.num_layers):
        gate = model.layers[str(i)].attn.lf_gate
        for conv, in_channels in ((gate.conv1, hidden), (gate.conv2, hidden // 2)):
            # torch.nn.Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * 2 * 1.
            bound = 1.0 / math.sqrt(2 * in_channels)
            # Uniform over the whole range: reaching close to the bound, mean ~0, std
            # bound/sqrt(3). The bias has few entries, so its lower check is looser.
            for p, reach in ((conv.weight, 0.9), (conv.bias, 0.5)):
                assert p.abs().max() <= bound
                assert p.abs().max() > reach * bound
            w = conv.weight.detach()
            assert abs(w.mean().item()) < 0.05 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_meta_build_imports_no_compiler() -> None:
    """Every process that saves, loads or converts a checkpoint builds the model on the meta
    device for its names and shapes; that must not drag in torch._dynamo (the embedding's own
    N(0, 1) init of a meta tensor did: 1.1 s of each 2B conversion)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tests.model.test_init import model_cfg\n"
        "from yuanlfa.model import build_model\n"
        "before = 'torch._dynamo' in sys.modules\n"
        "model = build_model(model_cfg(2))\n"
        "assert model.embed.weight.is_meta\n"
        "print(before, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_embedding_on_a_real_device_keeps_torch_init() -> None:
    """Built on a real device (no materialize), the embedding is N(0, 1) as nn.Embedding's own."""
    torch.manual_seed(0)
    model = build_model(model_cfg(1, hidden=256), device="cpu")
    weight = model.embed.weight
    assert isinstance(model.embed, torch.nn.Embedding) and weight.requires_grad
    assert abs(weight.std().item() - 1.0) < 0.05 and abs(weight.mean().item()) < 0.05
