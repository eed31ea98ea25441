"""The Triton LFA path (interpreted on CPU) trains exactly like the reference."""

from __future__ import annotations

import pytest

from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.train import train

pytest.importorskip("triton")


@pytest.mark.slow
def test_twenty_steps_triton_equals_reference(small_corpus: str) -> None:
    runs = {}
    for impl in ("reference", "triton"):
        cfg = tiny_overrides(small_corpus, train__steps=20, model__lfa_impl=impl)
        cfg["train"]["micro_batch_size"] = 8
        runs[impl] = train(config_from_dict(cfg), progress=False).records
    ref = [r["loss"] for r in runs["reference"]]
    tri = [r["loss"] for r in runs["triton"]]
    assert ref[-1] < ref[0] - 0.5  # the run actually trains
    assert tri == pytest.approx(ref, rel=1e-5)
    for a, b in zip(runs["reference"], runs["triton"]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_unavailable_triton_is_refused_before_training(
    small_corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = tiny_overrides(small_corpus, train__steps=1, model__lfa_impl="triton")
    with pytest.raises(ConfigError, match="model.lfa_impl"):
        train(config_from_dict(cfg), progress=False)
