"""Heterogeneous clusters: devices per pipeline rank from the cluster description and the rank
order, the balancer on each rank's own device (compared with exhaustive search over splits and
recompute modes), and one-line errors for bad descriptions."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import pytest

from yuanlfa.config import ConfigError, config_from_dict, load_config, resolve
from yuanlfa.planner.balance import balance
from yuanlfa.planner.cluster import mixed_cluster, pipeline_devices, tp_mixed
from yuanlfa.planner.cluster_plan import cluster_plan, predicted_busy_s
from yuanlfa.planner.cost import CostModel, cost_model
from yuanlfa.planner.devices import GIB, DevicePreset
from yuanlfa.planner.recompute import MODES, balance_recompute, with_recompute

from .test_balance import small, splits

ROOT = Path(__file__).resolve().parents[2]
FAST = DevicePreset("fast", 2e12, 64 * GIB, 10.0, gpu=False)
SLOW = DevicePreset("slow", 1e12, 64 * GIB, 10.0, gpu=False)


def groups(*specs) -> dict:
    return {
        "groups": [
            {"device": d, "nodes": n, "devices_per_node": k, **extra}
            for d, n, k, extra in (s if len(s) == 4 else (*s, {}) for s in specs)
        ],
        "inter_gbps": 12.5,
    }


def two_kinds(micro_batch: int, seq: int) -> dict:
    """8 small layers on pp 4: two ranks of a device twice as fast as the other two."""
    return {
        "model": {"num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": 512},
        "parallel": {"pp": 4, "pipeline_blocks": "auto"},
        "train": {"micro_batch_size": micro_batch, "global_batch_size": 16, "seq_length": seq},
        "cluster": groups(
            ("fast", 1, 2, {"memory_gib": 1, "tflops": 2}),
            ("slow", 1, 2, {"memory_gib": 1, "tflops": 1}),
        ),
    }


def brute_force(cfg, devices, limits) -> tuple:
    """The lexicographic optimum of recompute.CRITERIA over every split and every mode per
    rank, each plan costed by its own cost model (one split and one mode tuple at a time)."""
    pp, L = cfg.parallel.pp, cfg.model.num_layers
    best = None
    for modes in itertools.product(range(len(MODES)), repeat=pp):
        model = cost_model(
            with_recompute(cfg, tuple(MODES[m] for m in modes)), devices=devices, gpu=False
        )
        for blocks in splits(L, pp):
            mem = [model.rank_memory(r, (blocks[r],)) for r in range(pp)]
            if any(m > lim for m, lim in zip(mem, limits)):
                continue
            k = (
                max(model.rank_time(r, (blocks[r],)) for r in range(pp)),
                max(model.stage_time(s, b).total_s for s, b in enumerate(blocks)),
                max(modes),
                max(mem),
            )
            best = k if best is None or k < best else best
    return best


def plan_key(plan) -> tuple:
    model: CostModel = plan.model
    blocks, pp = plan.blocks, model.pp
    return (
        max(model.rank_time(r, (blocks[r],)) for r in range(pp)),
        max(model.stage_time(s, b).total_s for s, b in enumerate(blocks)),
        max(MODES.index(m) for m in plan.recompute),
        max(model.rank_memory(r, (blocks[r],)) for r in range(pp)),
    )


@pytest.mark.parametrize("layers,pp,quantile", [(7, 3, 0.5), (6, 3, 0.2), (8, 2, 0.3)])
def test_recompute_balancer_equals_exhaustive_search(layers, pp, quantile) -> None:
    cfg = small(layers, pp)
    # The slow ranks get a small device: a limit between the plans' memories, so it binds.
    free = cost_model(cfg, gpu=False)
    mems = sorted(free.rank_memory(0, (n,)) for n in range(layers + 1))
    small_mem = int(mems[int(quantile * layers)])
    small_dev = DevicePreset("slow-small", 1e12, small_mem, 10.0, gpu=False)
    devices = tuple(FAST if r % 2 == 0 else small_dev for r in range(pp))
    limits = [d.memory_bytes for d in devices]
    plan = balance_recompute(cfg, devices=devices, gpu=False)
    assert plan.cost.fits
    assert plan_key(plan) == brute_force(cfg, devices, limits)
    # The small device recomputes only if it must: at least one rank keeps "none" here.
    assert "none" in plan.recompute


def test_slow_ranks_get_fewer_layers_and_it_pays() -> None:
    cfg = small(16, 4)
    devices = (FAST, FAST, SLOW, SLOW)
    hetero = cost_model(cfg, devices=devices, gpu=False)
    homo = cost_model(cfg, device=FAST, gpu=False)
    aware = balance(cfg, model=hetero).blocks
    blind = balance(cfg, model=homo).blocks
    assert sum(aware[2:]) < sum(aware[:2])
    # The homogeneous plan, run on the mixed devices, is slower than the aware one.
    assert hetero.evaluate(aware).step_time_s < hetero.evaluate(blind).step_time_s
    # Exactness against exhaustive search on the heterogeneous model (time objective).
    best = min(max(hetero.rank_time(r, (b[r],)) for r in range(4)) for b in splits(16, 4))
    assert hetero.evaluate(aware).time_max_s == pytest.approx(best, rel=1e-12)


def test_speeds_scale_rank_time() -> None:
    cfg = small(8, 4)
    base = cost_model(cfg, device=FAST, gpu=False)
    slowed = cost_model(cfg, device=FAST, gpu=False, speeds=(1.0, 1.0, 0.5, 0.5))
    layer = base.layer_time(2)
    half = slowed.layer_time(2)
    assert half.forward_s == pytest.approx(2 * layer.forward_s)
    assert slowed.layer_time(0).forward_s == pytest.approx(layer.forward_s)
    with pytest.raises(ConfigError, match="speeds"):
        cost_model(cfg, device=FAST, gpu=False, speeds=(1.0, 0.0, 1.0, 1.0))


def test_pipeline_devices_follow_the_rank_order() -> None:
    cc = config_from_dict({"cluster": groups(("h100-80g", 1, 4), ("a100-40g", 1, 4))}).cluster
    cluster = mixed_cluster(cc)
    assert cluster.world_size == 8
    # tp-dp-pp: pp slowest, so pp rank 0 (ranks 0-3) is on the H100s, rank 1 on the A100s.
    devs = pipeline_devices(cluster, 2, 2, 2, "tp-dp-pp")
    assert [d.name for d in devs] == ["H100-SXM", "A100-40GB"]
    assert devs[1].memory_bytes == 40 * GIB
    # dp-tp-pp with pp 4: ranks r*2, r*2+1 for pp rank r -> two per kind.
    devs = pipeline_devices(cluster, 1, 4, 2, "dp-tp-pp")
    assert [d.name for d in devs] == ["H100-SXM"] * 2 + ["A100-40GB"] * 2
    # tp-pp-dp: dp slowest, so each pipeline spans both kinds: each pp rank holds both and runs
    # at the slower, smaller one.
    devs = pipeline_devices(cluster, 1, 4, 2, "tp-pp-dp")
    assert all(d.peak_flops == 312e12 and d.memory_bytes == 40 * GIB for d in devs)
    assert not tp_mixed(cluster, 4, 2, 1, "tp-dp-pp")
    assert tp_mixed(cluster, 8, 1, 1, "tp-dp-pp")
    # The reordered cluster puts the A100s first.
    swapped = cluster.reordered((1, 0))
    assert [d.name for d in pipeline_devices(swapped, 1, 2, 4, "tp-dp-pp")] == [
        "A100-40GB",
        "H100-SXM",
    ]


def test_custom_device_and_errors() -> None:
    cc = config_from_dict(
        {"cluster": groups(("mi-x", 1, 2, {"memory_gib": 24, "tflops": 100}))}
    ).cluster
    dev = mixed_cluster(cc).groups[0].device
    assert (dev.memory_bytes, dev.peak_flops) == (24 * GIB, 100e12)
    bad = config_from_dict({"cluster": groups(("h100-81g", 1, 2))}).cluster
    with pytest.raises(ConfigError, match=r"cluster.groups\[0\].device: 'h100-81g'.*h100-80g"):
        mixed_cluster(bad)
    with pytest.raises(ConfigError, match="set parallel.dp=1"):
        config_from_dict({"parallel": {"pp": 4, "dp": 2}, "cluster": groups(("h100-80g", 1, 4))})
    cfg = config_from_dict({"parallel": {"pp": 4}, "cluster": groups(("h100-80g", 1, 4))})
    with pytest.raises(ConfigError, match="launch 4"):
        resolve(cfg, 8)
    with pytest.raises(ConfigError, match="nodes: must be > 0"):
        config_from_dict({"cluster": groups(("h100-80g", 0, 4))})


def test_no_fit_names_the_shortfall_and_the_fix() -> None:
    # Full recompute of one layer at a time (the preset's block-of-2 method saves more).
    sets = ["parallel.dp=1", "train.recompute_method=uniform", "train.recompute_num_layers=1"]
    cfg = resolve(load_config(ROOT / "configs/yuan2-102b.yaml", sets), 32)
    cc = config_from_dict({"cluster": groups(("h100-80g", 2, 8), ("a100-40g", 2, 8))}).cluster
    with pytest.raises(ConfigError) as err:
        balance_recompute(cfg, cluster=mixed_cluster(cc))
    message = str(err.value)
    assert "\n" not in message
    # An H100 rank holds up to 3 layers of 102B (20 GiB of state each), an A100-40G 1: 62 of 84.
    assert "at most 62 layers" in message and "22 short" in message
    assert (
        "16 x H100-SXM: 2-3, 16 x A100-40GB: 0-1" in message and "optim.distributed=true" in message
    )


def _suggested(message: str) -> list[str]:
    """The overrides of "the smallest change that fits: K=V K=V (dp N) ... (predicted ...)"."""
    change = message.split("the smallest change that fits: ", 1)[1]
    return [w for w in change.split(" (predicted")[0].split() if "=" in w]


def test_no_fit_names_a_change_of_layout_that_does_fit() -> None:
    """102B at tp2 pp32 on 4 x 8 H100-80G + 4 x 8 A100-40G misses by 2 layers: the error names
    the nearest layout on the same 64 devices that fits, and that layout really fits."""
    sets = ["parallel.tp=2", "parallel.pp=32", "parallel.dp=1", "parallel.pipeline_blocks=auto"]
    cc = groups(("h100-80g", 4, 8), ("a100-40g", 4, 8))
    cfg = resolve(load_config(ROOT / "configs/yuan2-102b.yaml", sets), 64)
    cfg = dataclasses.replace(cfg, cluster=config_from_dict({"cluster": cc}).cluster)
    with pytest.raises(ConfigError) as err:
        cluster_plan(cfg)
    message = str(err.value)
    assert "\n" not in message and "2 short" in message
    assert "the smallest change that fits: parallel.tp=" in message
    assert "a larger parallel.pp/tp" not in message  # a concrete fix instead of the list
    fixed = load_config(ROOT / "configs/yuan2-102b.yaml", [*sets, *_suggested(message)])
    fixed = dataclasses.replace(resolve(fixed, 64), cluster=cfg.cluster)
    plan = cluster_plan(fixed)
    assert plan is not None and plan.model.evaluate(plan.blocks).fits


def test_no_fit_names_a_smaller_micro_batch_when_that_is_enough() -> None:
    """Activations are what overflows the small device: halving the micro batch fits, and the
    error says so before any change of layout."""
    data = two_kinds(micro_batch=8, seq=256)
    plan = cluster_plan(resolve(config_from_dict(data), 4))
    need = max(r.memory_bytes for r in plan.model.evaluate(plan.blocks).ranks)
    # Shrink every device until micro batch 8 overflows even with the balancer's recompute.
    for gib in (need / GIB * f / 20 for f in range(19, 0, -1)):
        for group in data["cluster"]["groups"]:
            group["memory_gib"] = gib
        try:
            cluster_plan(resolve(config_from_dict(data), 4))
        except ConfigError as exc:
            message = str(exc)
            break
    else:
        pytest.fail("no memory size made micro batch 8 overflow")
    assert "the smallest change that fits: train.micro_batch_size=" in message
    sets = _suggested(message)
    assert len(sets) == 1
    mbs = int(sets[0].split("=")[1])
    data["train"]["micro_batch_size"] = mbs
    assert cluster_plan(resolve(config_from_dict(data), 4)) is not None
    if mbs < 4:  # the change is the smallest: the next larger micro batch does not fit
        data["train"]["micro_batch_size"] = mbs * 2
        with pytest.raises(ConfigError):
            cluster_plan(resolve(config_from_dict(data), 4))


def test_no_fit_says_when_no_change_of_these_devices_fits() -> None:
    sets = ["parallel.tp=1", "parallel.pp=32", "parallel.dp=1", "parallel.pipeline_blocks=auto"]
    cfg = resolve(load_config(ROOT / "configs/yuan2-102b.yaml", sets), 32)
    cc = groups(("h100-80g", 2, 8), ("a100-40g", 2, 8))
    cfg = dataclasses.replace(cfg, cluster=config_from_dict({"cluster": cc}).cluster)
    with pytest.raises(ConfigError, match="other tp x pp x dp on these 32 devices fits either"):
        cluster_plan(cfg)


def test_102b_pp32_mixed_is_fast_and_fits_each_device() -> None:
    cfg = resolve(load_config(ROOT / "configs/yuan2-102b.yaml", ["parallel.dp=1"]), 32)
    cc = config_from_dict({"cluster": groups(("h200", 2, 8), ("a100-80g", 2, 8))}).cluster
    cluster = mixed_cluster(cc)
    balance_recompute(cfg, cluster=cluster)  # warm the shared caches (schedule, compositions)
    start = time.perf_counter()
    plan = balance_recompute(cfg, cluster=cluster)
    elapsed = time.perf_counter() - start
    assert elapsed < 10  # about a second on a quiet core (3 recompute modes x 32 ranks)
    assert plan.cost.fits
    for r in plan.cost.ranks:
        assert r.memory_bytes <= plan.model.limit_of(r.rank)
    # The A100s (pipeline ranks 16-31: 3.2x slower, less memory) hold fewer layers.
    assert sum(plan.blocks[16:]) < sum(plan.blocks[:16])


def test_cluster_plan_for_the_trainer() -> None:
    data = two_kinds(micro_batch=2, seq=64)
    cfg = resolve(config_from_dict(data), 4)
    plan = cluster_plan(cfg)
    assert sum(plan.blocks[:2]) > sum(plan.blocks[2:])
    busy = predicted_busy_s(plan)
    assert len(busy) == 4 and all(b > 0 for b in busy)
    assert cluster_plan(resolve(config_from_dict({**data, "cluster": {}}), 4)) is None
    # A given split that overfills the small device: a one-line error naming the rank.
    data["cluster"]["groups"][1]["memory_gib"] = 0.001
    data["parallel"]["pipeline_blocks"] = [2, 2, 2, 2]
    fix = r"it fits with parallel.pipeline_blocks=\[4, 4, 0, 0\]"
    with pytest.raises(ConfigError, match=rf"pipeline rank 2 .* holds 0.00 GiB; {fix}"):
        cluster_plan(resolve(config_from_dict(data), 4))


def test_even_split_is_not_preferred_over_a_small_devices_limit() -> None:
    """The balancer prefers the even split among equals; it must still fit each rank's own
    limit (not only the largest one): rank 0 cannot hold half the layers here, and the even
    split is faster than any split that fits, so only the per-rank check rules it out."""
    cfg = small(8, 2)
    free = cost_model(cfg, gpu=False)
    tight = DevicePreset("tight", 1e12, int(free.rank_memory(0, (4,))) - 1, 10.0, gpu=False)
    big = DevicePreset("big", 1e12, 64 * GIB, 10.0, gpu=False)
    model = cost_model(cfg, devices=(tight, big), gpu=False)
    blocks = balance(cfg, model=model).blocks
    assert blocks[0] < 4
    assert model.rank_memory(0, (blocks[0],)) <= tight.memory_bytes
