"""Attention dropout in the model: off in evaluation, the expected value of the dropped
attention is the undropped one, and with p = 0 the model is the one without dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from yuanlfa.config import ModelConfig
from yuanlfa.model import create_model
from yuanlfa.model.attention import causal_attention
from yuanlfa.model.dropout import DropoutKey, DropoutStep, LayerDropout, dropout_step

CFG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=128)


def _inputs(document: bool = False):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    pos = torch.arange(16).expand(2, 16)
    if document:
        pos = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    return ids, pos


@pytest.mark.parametrize("document", [False, True])
def test_off_in_evaluation_and_p0_is_the_plain_model(document: bool) -> None:
    ids, pos = _inputs(document)
    base = dataclasses.replace(CFG, document_attention=document)
    plain = create_model(base, seed=1)
    dropped = create_model(dataclasses.replace(base, attention_dropout=0.3), seed=1)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(ids, pos), dropped(ids, pos))
    dropped.train()
    with dropout_step(DropoutStep(1, 0, (0, 1), 2)), torch.no_grad():
        assert not torch.allclose(plain(ids, pos), dropped(ids, pos))


@pytest.mark.parametrize("document", [False, True])
def test_dropped_attention_is_unbiased(document: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 1, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    starts = None
    if document:
        starts = torch.zeros(12, 1, dtype=torch.bool)
        starts[5] = True
    exact = causal_attention(q, k, v, "math", starts)
    draws = [
        causal_attention(q, k, v, "auto", starts, LayerDropout(DropoutKey(0.2, i, 0, (0,)), 0, 0))
        for i in range(2000)
    ]
    mean = torch.stack(draws).mean(0)
    assert torch.allclose(mean, exact, atol=0.03)
    zero = LayerDropout(DropoutKey(0.0, 0, 0, (0,)), 0, 0)
    assert torch.equal(
        causal_attention(q, k, v, "auto", starts, zero), causal_attention(q, k, v, "auto", starts)
    )


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"attention_dropout": 1.0}, r"model.attention_dropout: must be in \[0, 1\)"),
        ({"attention_dropout": -0.1}, r"model.attention_dropout: must be in \[0, 1\)"),
        ({"attention_dropout": 0.1, "attention": "mine"}, "built-in causal attention"),
    ],
)
def test_bad_dropout_settings_name_the_fix(model: dict, needle: str) -> None:
    from yuanlfa.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"model": model})
