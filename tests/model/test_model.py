"""The single-device model against a forward pass written out by hand from docs/yuan2_facts.md."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from yuanlfa.config import Config, ModelConfig, config_from_dict, load_config, resolve
from yuanlfa.model import YuanModel, build_model, create_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EPS = 1e-6
# The model runs in fp32 and is compared with an fp64 computation from the same weights.
TOL = {"rtol": 1e-5, "atol": 1e-5}
LFA_PARAMS = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "norm.weight")


def model_cfg(num_layers: int = 1, **model: object) -> ModelConfig:
    data = {"num_layers": num_layers, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}
    data.update(model)
    return resolve(config_from_dict({"model": data}), world_size=1).model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of O(1) effect (the 0.02 init would hide a swapped input inside rounding noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif p.dim() == 4:  # conv [out, in, 2, 1]
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]) * (1.5 if "embed" not in name else 1.0))


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def shift(x: torch.Tensor) -> torch.Tensor:
    """x_{t-1} along dim 0 with x_{-1} = 0."""
    return torch.cat((torch.zeros_like(x[:1]), x[:-1]))


def lfa_by_hand(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = p["conv1.weight"], p["conv2.weight"]
    y = shift(x) @ w1[:, :, 0, 0].T + x @ w1[:, :, 1, 0].T + p["conv1.bias"]
    z = shift(y) @ w2[:, :, 0, 0].T + y @ w2[:, :, 1, 0].T + p["conv2.bias"]
    return rmsnorm(z + x, p["norm.weight"])


def rope_by_hand(t: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """t: [s, b, heads, d]; complex rotation of the pairs (i, i + d/2)."""
    d = t.shape[-1]
    inv = base ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    theta = pos.double()[:, :, None, None] * inv
    z = torch.complex(t[..., : d // 2], t[..., d // 2 :]) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat((z.real, z.imag), -1)


def attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[s, b, heads, d] each; causal softmax attention."""
    s, d = q.shape[0], q.shape[-1]
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)


def forward_by_hand(
    model: YuanModel,
    ids: torch.Tensor,
    pos: torch.Tensor | None = None,
    variant: str = "design",
) -> torch.Tensor:
    """Logits [b, s, vocab] in fp64. variant: "design", "qk_unfiltered" or "v_filtered"."""
    cfg = model.cfg
    w = {n: p.detach().double() for n, p in model.named_parameters()}
    b, s = ids.shape
    heads, d = cfg.num_heads, cfg.head_dim
    if pos is None:
        pos = torch.arange(s).expand(b, s)
    pos = pos.t()
    hidden = w["embed.weight"][ids.t()]  # [s, b, h]
    for i in model.layers:
        pre = f"layers.{i}."
        xn = rmsnorm(hidden, w[pre + "input_norm.weight"])
        lfa = {n: w[pre + "attn.lf_gate." + n] for n in LFA_PARAMS}
        filtered = lfa_by_hand(xn, lfa)
        qk_in, v_in = filtered, xn
        if variant == "qk_unfiltered":
            qk_in = xn
        elif variant == "v_filtered":
            v_in = filtered
        v = (v_in @ w[pre + "attn.v_proj.weight"].T).view(s, b, heads, d)
        qk = (qk_in @ w[pre + "attn.qk_proj.weight"].T).view(s, b, heads, 2 * d)
        q, k = qk[..., :d], qk[..., d:]
        q, k = rope_by_hand(q, pos, cfg.rope_base), rope_by_hand(k, pos, cfg.rope_base)
        ctx = attention_by_hand(q, k, v).reshape(s, b, heads * d)
        hidden = hidden + ctx @ w[pre + "attn.o_proj.weight"].T
        xn = rmsnorm(hidden, w[pre + "post_attn_norm.weight"])
        up = xn @ w[pre + "mlp.fc1.weight"].T
        a, g = up[..., : cfg.ffn_size], up[..., cfg.ffn_size :]
        hidden = hidden + (F.silu(a) * g) @ w[pre + "mlp.fc2.weight"].T
    final = rmsnorm(hidden, w["final_norm.weight"])
    return (final @ w["embed.weight"].T).transpose(0, 1)


@pytest.fixture
def one_layer() -> YuanModel:
    model = create_model(model_cfg(1), seed=7)
    randomize(model, seed=8)
    return model


def test_parameter_names_and_shapes() -> None:
    cfg = model_cfg(2)
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    per_layer = {
        "input_norm.weight": (h,),
        "attn.lf_gate.conv1.weight": (h // 2, h, 2, 1),
        "attn.lf_gate.conv1.bias": (h // 2,),
        "attn.lf_gate.conv2.weight": (h, h // 2, 2, 1),
        "attn.lf_gate.conv2.bias": (h,),
        "attn.lf_gate.norm.weight": (h,),
        "attn.qk_proj.weight": (2 * h, h),
        "attn.v_proj.weight": (h, h),
        "attn.o_proj.weight": (h, h),
        "post_attn_norm.weight": (h,),
        "mlp.fc1.weight": (2 * f, h),
        "mlp.fc2.weight": (h, f),
    }
    expected = {"embed.weight": (v, h), "final_norm.weight": (h,)}
    for i in range(2):
        expected.update({f"layers.{i}.{n}": s for n, s in per_layer.items()})
    got = {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}
    assert got == expected


def test_forward_matches_hand_computation(one_layer: YuanModel) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    out = one_layer(ids)
    assert out.shape == (2, 9, 128) and out.dtype == torch.float32
    exp = forward_by_hand(one_layer, ids)
    torch.testing.assert_close(out.double(), exp, **TOL)
    # The test would notice Q,K computed from the unfiltered input, or V from the filtered one.
    for variant in ("qk_unfiltered", "v_filtered"):
        wrong = forward_by_hand(one_layer, ids, variant=variant)
        assert (wrong - exp).abs().max() > 1e-2, variant


def test_two_layer_forward_matches_hand_computation() -> None:
    model = create_model(model_cfg(2), seed=3)
    randomize(model, seed=4)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).double(), forward_by_hand(model, ids), **TOL)


def test_mlp_silu_branch_is_first_half(one_layer: YuanModel) -> None:
    mlp = one_layer.layers["0"].mlp
    x = torch.randn(5, 64, dtype=torch.float64)
    w1, w2 = mlp.fc1.weight.double(), mlp.fc2.weight.double()
    f = w2.shape[1]
    exp = (F.silu(x @ w1[:f].T) * (x @ w1[f:].T)) @ w2.T
    torch.testing.assert_close(mlp.double()(x), exp, rtol=1e-12, atol=1e-12)
    swapped = (F.silu(x @ w1[f:].T) * (x @ w1[:f].T)) @ w2.T
    assert (swapped - exp).abs().max() > 1e-2


def test_tied_head(one_layer: YuanModel) -> None:
    assert one_layer.output is None
    assert one_layer.head_weight() is one_layer.embed.weight
    captured = {}
    one_layer.final_norm.register_forward_hook(lambda m, i, o: captured.update(h=o))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    logits = one_layer(ids)
    exp = (captured["h"] @ one_layer.embed.weight.T).transpose(0, 1)
    torch.testing.assert_close(logits, exp, rtol=1e-6, atol=1e-6)


def test_untied_head_has_its_own_weight() -> None:
    model = create_model(model_cfg(1, tie_embeddings=False), seed=1)
    assert model.output is not None
    assert model.output.weight.shape == (128, 64)
    assert model.head_weight() is model.output.weight
    assert not torch.equal(model.output.weight, model.embed.weight)


def test_per_token_loss(one_layer: YuanModel) -> None:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 128, (3, 8), generator=g)
    labels = torch.randint(0, 128, (3, 8), generator=g)
    losses = one_layer(ids, labels=labels)
    assert losses.shape == (3, 8) and losses.dtype == torch.float32
    logits = forward_by_hand(one_layer, ids)
    exp = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(losses.double(), exp.view(3, 8), **TOL)
    # Labels belong to their own row and position (a transposition would mix them up).
    exp_manual = torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(losses.double(), exp_manual, **TOL)


def test_restarting_positions_leave_first_document_unchanged(one_layer: YuanModel) -> None:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]).expand(2, 8)
    plain = one_layer(ids)
    packed = one_layer(ids, position_ids=pos)
    torch.testing.assert_close(packed[:, :5], plain[:, :5], rtol=0, atol=0)
    assert (packed[:, 5:] - plain[:, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(packed.double(), forward_by_hand(one_layer, ids, pos), **TOL)


def test_lfa_reset_at_doc_start_switch() -> None:
    # With the switch on, the filter restarts where the positions restart; the first document
    # is unaffected and the second changes (attention still crosses documents, as in Yuan).
    cfg = model_cfg(1)
    plain = create_model(cfg, seed=2)
    reset = create_model(model_cfg(1, lfa_reset_at_doc_start=True), seed=2)
    randomize(plain, 9)
    reset.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(6))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    a, b = plain(ids, position_ids=pos), reset(ids, position_ids=pos)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_backward_reaches_every_parameter(one_layer: YuanModel) -> None:
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    one_layer(ids, labels=ids.roll(-1, 1)).mean().backward()
    for name, p in one_layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stage_without_embedding_takes_hidden() -> None:
    cfg = model_cfg(2)
    full = create_model(cfg, seed=5)
    randomize(full, 6)
    first = create_model(cfg, seed=5, layer_ids=[0], has_head=False)
    last = create_model(cfg, seed=5, layer_ids=[1], has_embedding=False)
    first.load_state_dict({k: v for k, v in full.state_dict().items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in full.state_dict().items() if k in last.state_dict()})
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    hidden = first(ids)
    assert hidden.shape == (6, 2, 64)
    torch.testing.assert_close(last(hidden=hidden), full(ids), rtol=0, atol=0)
    with pytest.raises(ValueError):
        last(ids)
    with pytest.raises(ValueError):
        create_model(cfg, seed=5, layer_ids=[2])


def closed_form_params(cfg: ModelConfig) -> int:
    """Embedding + layers + final norm, with no biases except the LFA convs."""
    h, f, v, n = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.num_layers
    lfa = (h // 2) * h * 2 + h // 2 + h * (h // 2) * 2 + h + h  # conv1, conv2, its norm
    attn = 2 * h * h + h * h + h * h  # qk, v, o
    mlp = h * 2 * f + f * h
    per_layer = h + lfa + attn + h + mlp  # with the two layer norms
    return v * h + n * per_layer + h


@pytest.mark.parametrize(
    ("name", "paper"),
    [("yuan2-2b", 2.09e9), ("yuan2-51b", 51.85e9), ("yuan2-102b", 102.58e9)],
)
def test_preset_parameter_counts_on_meta(name: str, paper: float) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    start = time.perf_counter()
    model = build_model(cfg.model)
    elapsed = time.perf_counter() - start
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    total = sum(p.numel() for p in params)
    assert total == closed_form_params(cfg.model)
    assert abs(total - paper) / paper < 0.005, (total, paper)
    assert elapsed < 20.0


def test_tiny_cfg_fixture_builds(tiny_cfg: Config) -> None:
    model = create_model(tiny_cfg.model, seed=tiny_cfg.train.seed)
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(tiny_cfg.model)
