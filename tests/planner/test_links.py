"""Link costs: the alpha-beta ring formulas, the intra/inter-node choice by rank order, and the
cost model's collective terms on those links."""

from __future__ import annotations

import pytest

from yuanlfa.config import ConfigError, config_from_dict, resolve
from yuanlfa.planner import cost_model, get_device
from yuanlfa.planner.comm import embedding_tp_s, layer_tp_s
from yuanlfa.planner.links import (
    Link,
    ring_all_gather_s,
    ring_all_reduce_s,
    ring_reduce_scatter_s,
)
from yuanlfa.planner.topology import Cluster, link_plan

ALPHA, GBPS = 20e-6, 12.5
FAST, SLOW = Link(400.0, 1e-6), Link(12.5, 20e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("nbytes", [0, 4096, 3_000_000])
def test_ring_formulas_are_alpha_beta(n: int, nbytes: int) -> None:
    link = Link(GBPS, ALPHA)
    beta = 1 / (GBPS * 1e9)  # seconds per byte
    # Ring reduce-scatter / all-gather: n - 1 steps, each moving 1/n of the buffer.
    phase = (n - 1) * ALPHA + (n - 1) * (nbytes / n) * beta
    assert ring_reduce_scatter_s(nbytes, n, link) == pytest.approx(phase, abs=1e-15)
    assert ring_all_gather_s(nbytes, n, link) == pytest.approx(phase, abs=1e-15)
    # All-reduce: both phases, 2 (n - 1) latency hops and 2 (n - 1) / n of the bytes.
    full = 2 * (n - 1) * ALPHA + 2 * (n - 1) / n * nbytes * beta
    assert ring_all_reduce_s(nbytes, n, link) == pytest.approx(full, abs=1e-15)
    assert link.transfer_s(nbytes) == pytest.approx(ALPHA + nbytes * beta)


def test_link_checks() -> None:
    with pytest.raises(ConfigError, match="bandwidth must be > 0"):
        Link(0.0)
    with pytest.raises(ConfigError, match="latency must be >= 0"):
        Link(1.0, -1e-6)
    with pytest.raises(ConfigError, match="--nodes"):
        Cluster(0, 8, FAST, SLOW)
    assert Link(10.0, 1e-5).scaled(0.5).gbps == 5.0


def _crossing(cluster: Cluster, tp: int, pp: int, dp: int, order: str) -> set[str]:
    return set(link_plan(cluster, tp, pp, dp, order).crossing)


def test_rank_order_picks_intra_or_inter_links() -> None:
    two_by_four = Cluster(2, 4, FAST, SLOW)
    # tp fastest: a tp group of 4 is one node; the pipeline's two ranks sit on the two nodes.
    plan = link_plan(two_by_four, 4, 2, 1, "tp-dp-pp")
    assert plan.tp == FAST and plan.p2p[0] == SLOW and plan.crossing == {"pp"}
    # With tp second (dp-tp-pp, dp = 1 changes nothing): the same.
    assert link_plan(two_by_four, 4, 2, 1, "dp-tp-pp").crossing == {"pp"}
    plan = link_plan(two_by_four, 2, 2, 2, "dp-tp-pp")  # dp, then tp, inside a node; pp across
    assert plan.tp == FAST and plan.dp == FAST and plan.crossing == {"pp"}
    plan = link_plan(two_by_four, 2, 2, 2, "tp-pp-dp")  # tp, then pp, inside a node; dp across
    assert plan.dp == SLOW and plan.p2p[0] == FAST and plan.crossing == {"dp"}
    # tp wider than a node must cross.
    assert _crossing(Cluster(2, 2, FAST, SLOW), 4, 1, 1, "tp-dp-pp") == {"tp"}
    # The interleaved wrap-around (last rank -> first) is a boundary of its own.
    plan = link_plan(Cluster(4, 1, FAST, SLOW), 1, 4, 1, "tp-dp-pp")
    assert plan.p2p == (SLOW,) * 4 and plan.embed == SLOW
    with pytest.raises(ConfigError, match="cluster has 2 nodes x 4 devices = 8"):
        link_plan(two_by_four, 2, 2, 1, "tp-dp-pp")


def _cfg(tp: int, pp: int, dp: int, order: str = "tp-dp-pp", sp: bool = False, bucket=None):
    parallel = {"tp": tp, "pp": pp, "dp": dp, "rank_order": order, "sequence_parallel": sp}
    if bucket is not None:
        parallel["grad_bucket_size"] = bucket
    data = {
        "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 512},
        "parallel": parallel,
        "train": {"micro_batch_size": 2, "global_batch_size": 16, "seq_length": 32},
    }
    return resolve(config_from_dict(data), tp * pp * dp)


def test_cost_model_uses_the_group_links() -> None:
    cfg = _cfg(2, 2, 1)
    act = 4 * 64 * 2 * 32  # fp32 [s, b, h]
    inside = cost_model(cfg, get_device("cpu"), cluster=Cluster(2, 2, FAST, SLOW))
    across = cost_model(cfg, get_device("cpu"), cluster=Cluster(4, 1, FAST, SLOW))
    assert inside.links.tp == FAST and across.links.tp == SLOW
    layer = across.layer_time()
    # Without SP: o_proj and fc2 all-reduce in the forward, v_proj, qk_proj, fc1 in the backward.
    assert layer.forward_comm_s == pytest.approx(2 * ring_all_reduce_s(act, 2, SLOW))
    assert layer.comm_s == pytest.approx(5 * ring_all_reduce_s(act, 2, SLOW))
    assert inside.layer_time().comm_s == pytest.approx(5 * ring_all_reduce_s(act, 2, FAST))
    # P2P: stage 0 sends its activation to stage 1 over the pipeline boundary's link.
    stage0 = across.stage_time(0, 2)
    sends = stage0.comm_split[0] - 2 * layer.forward_comm_s
    sends -= embedding_tp_s(cfg.model, across.spec, False, SLOW)
    assert sends == pytest.approx(SLOW.transfer_s(act))


def test_sequence_parallel_moves_the_same_bytes_in_halves() -> None:
    cfg = _cfg(2, 1, 1, sp=True)
    model = cost_model(cfg, get_device("cpu"), cluster=Cluster(2, 1, FAST, Link(1.0)))
    spec = model.spec
    act = 4 * 64 * 2 * 32
    fwd, bwd = layer_tp_s(cfg.model, spec, True, Link(1.0))
    halo = ring_all_gather_s(2 * 2 * 2 * 64 * 4, 2, Link(1.0))  # 2 rows per rank, fp32
    # 3 all-gathers + 2 reduce-scatters forward, the reverse backward: 5 all-reduces' bytes.
    assert fwd == pytest.approx(5 * act / 2 / 1e9 + halo)
    assert bwd == pytest.approx(fwd)


def test_data_parallel_buckets_pay_latency() -> None:
    lat = Link(1e6, 1e-3)  # bandwidth practically free: latency only
    cluster = Cluster(4, 1, lat, lat)
    params = 1000
    one = cost_model(_cfg(1, 1, 4), get_device("cpu"), cluster=cluster)
    # All-reduce of one bucket over 4 ranks: 2 * 3 latency hops.
    assert one.dp_comm_s(params) == pytest.approx(2 * 3 * 1e-3, rel=1e-3)
    ten = cost_model(_cfg(1, 1, 4, bucket=100), get_device("cpu"), cluster=cluster)
    assert ten.dp_comm_s(params) == pytest.approx(10 * 2 * 3 * 1e-3, rel=1e-3)
