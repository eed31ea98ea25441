"""The weak-link claim in the cost model (docs/yuan2_facts.md), and calibrating the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from yuanlfa.config import config_from_dict, load_config, resolve
from yuanlfa.planner import cost_model, get_device
from yuanlfa.planner.calibrate import fit_flops_per_s, fit_latency_s, flops_from_layer_time
from yuanlfa.planner.flops import flops_per_token
from yuanlfa.planner.links import Link
from yuanlfa.planner.topology import Cluster
from yuanlfa.planner.weak_link import METHOD_1, METHOD_2, paper_comparison

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def yuan_102b():
    return load_config(ROOT / "configs/yuan2-102b.yaml")


@pytest.mark.parametrize("world", [96, 256])
def test_tp_degrades_where_pp_dp_zero_holds(yuan_102b, world: int) -> None:
    """The paper's comparison: as the chip-to-chip bandwidth falls 4x (400 -> 100 GB/s), the
    tensor-parallel layout slows down many times more than pp + dp + ZeRO, which barely moves;
    over a wider drop (to 12.5 GB/s) tp slows by half or more while pp + dp stays within 5%."""
    device = get_device("A100-80GB")
    for bandwidths, pp_limit, tp_floor in (((400, 200, 100), 1.01, 1.05), ((400, 12.5), 1.05, 1.5)):
        results = {r.name: r for r in paper_comparison(yuan_102b, device, world, bandwidths)}
        tp, pp = results[METHOD_1], results[METHOD_2]
        for r in (tp, pp):  # less bandwidth never helps
            assert list(r.step_times_s) == sorted(r.step_times_s)
        assert pp.slowdown < pp_limit
        assert tp.slowdown > tp_floor
        assert tp.slowdown - 1 > 10 * (pp.slowdown - 1)
        # pp + dp + ZeRO is the faster method at every bandwidth (as in the paper).
        assert all(a < b for a, b in zip(pp.step_times_s, tp.step_times_s))


def _cfg():
    data = {
        "model": {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "vocab_size": 384},
        "parallel": {"tp": 2, "pp": 1, "dp": 1},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64},
    }
    return resolve(config_from_dict(data), 2)


def _predict(cfg, flops: float, latency: float) -> float:
    link = Link(0.1, latency)
    model = cost_model(cfg, get_device("cpu"), flops_per_s=flops, cluster=Cluster(2, 1, link, link))
    return model.evaluate((4,)).step_time_s


def test_calibration_recovers_the_constants() -> None:
    cfg = _cfg()
    flops, latency = 3e10, 2e-3
    measured = _predict(cfg, flops, latency)
    assert fit_flops_per_s(lambda f: _predict(cfg, f, latency), measured) == pytest.approx(
        flops, rel=1e-6
    )
    assert fit_latency_s(lambda a: _predict(cfg, flops, a), measured) == pytest.approx(
        latency, rel=1e-6
    )
    # A measurement faster than the model allows with no latency at all clamps to zero.
    assert fit_latency_s(lambda a: _predict(cfg, flops, a), measured / 10) == 0.0


def test_flops_from_layer_time() -> None:
    cfg = _cfg()
    terms = flops_per_token(cfg.model, 64)
    per_layer = (terms["projections"] + terms["mlp"] + terms["attention"] + terms["lfa"]) / 4
    assert flops_from_layer_time(cfg.model, 64, 128, 0.5) == pytest.approx(per_layer * 128 / 0.5)
    # A calibrated rate replaces peak * mfu: time scales inversely with it.
    slow = cost_model(cfg, flops_per_s=1e9).layer_time().forward_s
    fast = cost_model(cfg, flops_per_s=4e9).layer_time().forward_s
    assert slow == pytest.approx(4 * fast)
