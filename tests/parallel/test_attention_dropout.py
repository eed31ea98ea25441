"""Attention dropout (model.attention_dropout, Yuan 2.0's --flash-attn-drop 0.1) draws the same
masks in every layout: 20 training steps at tp2 + sequence parallelism, pp2 and dp2 equal one
process (fp32), and with activation recompute the recomputed forward draws the same masks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict
from yuanlfa.model.dropout import DropoutKey
from yuanlfa.train import train

STEPS = 20
DROP = 0.1
# Heads are what tp splits and layers what pp splits: 4 of each, and two documents per sample
# (document attention) so the dense per-document mask path is covered too.
LAYOUTS = {
    "tp2+sp": {"parallel__tp": 2, "parallel__sequence_parallel": True},
    "pp2": {"parallel__pp": 2, "parallel__pipeline_blocks": [1, 3]},
    "dp2": {"parallel__dp": 2},
}


def _train(corpus: str, steps: int = STEPS, **extra) -> list[tuple[float, float]]:
    cfg = tiny_overrides(
        corpus,
        train__steps=steps,
        model__num_layers=4,
        model__attention_dropout=extra.pop("drop", DROP),
        model__loss_block_size=100,
        **extra,
    )
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"]) for r in records]


def _layouts(rank: int, world: int, corpus: str) -> dict[str, list[tuple[float, float]]]:
    return {name: _train(corpus, **extra) for name, extra in LAYOUTS.items()}


def _same(run, reference, what: str) -> None:
    assert len(run) == len(reference) == STEPS, what
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(run, reference)):
        assert loss == pytest.approx(ref_loss, rel=1e-5), (what, step)
        assert norm == pytest.approx(ref_norm, rel=1e-4), (what, step)


@pytest.mark.slow
def test_dropout_is_layout_free(small_corpus: str) -> None:
    single = _train(small_corpus)
    plain = _train(small_corpus, drop=0.0)
    # The dropout is really on: the trajectory differs from the undropped one from step 1.
    assert single[0][0] != pytest.approx(plain[0][0], rel=1e-4)
    assert single[-1][0] < single[0][0] - 1.0  # and it still trains
    results = run_distributed(_layouts, 2, small_corpus, timeout=900)
    for rank_result in results:
        for name, run in rank_result.items():
            # Every rank reports the global loss (pp: sent from the last stage).
            _same(run, single, name)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_redraws_the_same_masks(small_corpus: str, recompute: str) -> None:
    steps = 3
    reference = _train(small_corpus, steps)
    again = _train(small_corpus, steps, train__recompute=recompute)
    assert again == reference


def test_masks_are_drawn_per_global_head_and_sample() -> None:
    key = DropoutKey(0.25, seed=7, step=3, samples=(10, 11))
    whole = key.keep_mask(layer=1, head_offset=0, heads=4, shape=(8, 8), device="cpu")
    assert whole.shape == (2, 4, 8, 8)
    # A tp rank holding heads 2 and 3 draws exactly those heads' masks.
    half = key.keep_mask(layer=1, head_offset=2, heads=2, shape=(8, 8), device="cpu")
    assert torch.equal(half, whole[:, 2:])
    # A dp rank holding only sample 11 draws that sample's masks.
    one = DropoutKey(0.25, seed=7, step=3, samples=(11,))
    assert torch.equal(one.keep_mask(1, 0, 4, (8, 8), "cpu"), whole[1:])
    # Other layers and steps draw other masks; about p of the entries are dropped.
    assert not torch.equal(key.keep_mask(2, 0, 4, (8, 8), "cpu"), whole)
    assert not torch.equal(
        DropoutKey(0.25, 7, 4, (10, 11)).keep_mask(1, 0, 4, (8, 8), "cpu"), whole
    )
    big = key.keep_mask(0, 0, 4, (64, 64), "cpu")
    assert 1 - big.float().mean().item() == pytest.approx(0.25, abs=0.02)
