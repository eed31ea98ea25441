"""Incremental decoding with InferenceCache reproduces the full forward pass."""

from __future__ import annotations

import pytest
import torch

from yuanlfa.config import Config
from yuanlfa.model import InferenceCache, YuanModel, create_model, generate

EPS = 1e-6
# Cached and full passes sum attention in different orders; fp32 rounding only.
TOL = {"rtol": 1e-5, "atol": 1e-5}
SEQ = 10


@pytest.fixture
def model(tiny_cfg: Config) -> YuanModel:
    m = create_model(tiny_cfg.model, seed=21)
    # Larger weights than the 0.02 init so that every layer and the filter matter in the logits.
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(1.0 + 9.0 * torch.rand(p.shape, generator=g))
    return m.eval()


def ids_for(batch: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 2, 5, SEQ - 1, SEQ])
@torch.no_grad()
def test_prefill_then_steps_match_full_forward(model: YuanModel, batch: int, k: int) -> None:
    ids = ids_for(batch, seed=k)
    full = model(ids)  # [b, s, vocab]
    cache = InferenceCache()
    prefill = model(ids[:, :k], cache=cache)
    torch.testing.assert_close(prefill, full[:, :k], **TOL)
    assert cache.length == k
    for t in range(k, SEQ):
        step = model(ids[:, t : t + 1], cache=cache)
        assert step.shape == (batch, 1, 128)
        torch.testing.assert_close(step[:, 0], full[:, t], **TOL, msg=lambda m, t=t: f"t={t} {m}")
    assert cache.length == SEQ
    for layer_id in model.layers:
        lc = cache.layers[int(layer_id)]
        assert lc.k.shape == lc.v.shape == (SEQ, batch, 4, 16)


@torch.no_grad()
def test_token_by_token_from_empty_cache(model: YuanModel) -> None:
    ids = ids_for(2, seed=3)
    full = model(ids)
    cache = InferenceCache()
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(SEQ)], dim=1)
    torch.testing.assert_close(steps, full, **TOL)


@torch.no_grad()
def test_multi_token_steps_after_prefill(model: YuanModel) -> None:
    # Chunks of several tokens over a non-empty cache use the bottom-right causal mask.
    ids = ids_for(2, seed=4)
    full = model(ids)
    cache = InferenceCache()
    outs = [model(ids[:, lo:hi], cache=cache) for lo, hi in ((0, 3), (3, 7), (7, SEQ))]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


@pytest.mark.parametrize("k", [1, 2, 6])
@torch.no_grad()
def test_cache_holds_lfa_state_of_last_token(model: YuanModel, k: int) -> None:
    ids = ids_for(2, seed=5)[:, :k]
    layer_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, i=int(i): layer_inputs.__setitem__(i, args[0].double())
        )
        for i, layer in model.layers.items()
    ]
    cache = InferenceCache()
    model(ids, cache=cache)
    for h in hooks:
        h.remove()
    # The first layer's input is the embedding itself.
    emb = model.embed.weight.double()[ids.t()]
    torch.testing.assert_close(layer_inputs[0], emb, rtol=0, atol=0)
    for i, layer in model.layers.items():
        gate = layer.attn.lf_gate
        x = rmsnorm(layer_inputs[int(i)], layer.input_norm.weight.double())  # [k, b, h]
        state = cache.layers[int(i)].lfa
        torch.testing.assert_close(state.x.double(), x[-1], **TOL)
        w1 = gate.conv1.weight.double()
        x_prev = x[-2] if k > 1 else torch.zeros_like(x[-1])
        y = x_prev @ w1[:, :, 0, 0].T + x[-1] @ w1[:, :, 1, 0].T + gate.conv1.bias.double()
        torch.testing.assert_close(state.y.double(), y, **TOL)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_equals_argmax_loop(model: YuanModel, batch: int) -> None:
    prompt = ids_for(batch, seq=4, seed=6)
    new = 6
    out = generate(model, prompt, new)
    assert out.shape == (batch, 4 + new)
    assert torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(new):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(out, seq)


def test_generate_zero_new_tokens_and_bad_input(model: YuanModel) -> None:
    prompt = ids_for(2, seq=3)
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError):
        generate(model, prompt[0], 2)
    with pytest.raises(ValueError):
        generate(model, prompt, -1)


def test_generate_eod_keeps_emitting_eod(model: YuanModel) -> None:
    prompt = ids_for(2, seq=4, seed=6)
    greedy = generate(model, prompt, 6)
    # Choose the eod as row 0's second generated token: row 0 must repeat it afterwards.
    eod = int(greedy[0, 5])
    assert (greedy[0, 6:] != eod).any(), "greedy repeats eod anyway: the check would be vacuous"
    out = generate(model, prompt, 6, eod_id=eod)
    assert torch.equal(out[0, :6], greedy[0, :6])
    assert (out[0, 6:] == eod).all()
    # Row 1 is unaffected until it emits eod itself.
    row1 = greedy[1, 4:].tolist()
    stop = row1.index(eod) + 1 if eod in row1 else len(row1)
    assert out[1, 4 : 4 + stop].tolist() == row1[:stop]
    assert (out[1, 4 + stop :] == eod).all()
