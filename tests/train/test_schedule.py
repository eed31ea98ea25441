from __future__ import annotations

import math

import pytest

from yuanlfa.config import OptimConfig
from yuanlfa.train.schedule import learning_rate


def test_warmup_then_cosine_to_min() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    total = 110
    lrs = [learning_rate(cfg, s, total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    mid = 10 + 50
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[total] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1)


def test_linear_and_constant() -> None:
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, lr_schedule="linear", decay_steps=4)
    assert [learning_rate(lin, s, 100) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    const = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, lr_schedule="constant")
    assert [learning_rate(const, s, 10) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])
