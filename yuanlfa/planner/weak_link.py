"""Step time against link bandwidth: the paper's weak-link comparison, with our cost model.

The Yuan 2.0 paper (docs/yuan2_facts.md 6) predicts 102B's step time on 96 and 256 chips at a chip-
to-chip ("P2P") bandwidth of 400, 200 and 100 GB/s for two methods: "method 1", tensor parallelism,
whose time grows 1.85x (96 chips) as the bandwidth falls 4x, and "method 2", pipeline + data +
optimizer parallelism, which moves 0.4%. The paper does not spell out method 1's layout; we read it
as the same data parallelism with tp 8 x pp 4 in place of pp 32 (tp inside an 8-device node, where
the P2P links are). One bandwidth is swept for every link (intra- and inter-node alike), so both
methods see the same network and only what they send over it differs: tp sends every layer's
activations several times per microbatch, pp one activation per stage boundary, dp the gradients
once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from yuanlfa.config import Config
from yuanlfa.layout import uniform_blocks
from yuanlfa.planner.advisor import Layout, apply_layout
from yuanlfa.planner.cost import PlanCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, DevicePreset
from yuanlfa.planner.links import Link
from yuanlfa.planner.topology import Cluster

PAPER_BANDWIDTHS_GBPS = (400.0, 200.0, 100.0)
# docs/yuan2_facts.md: predicted seconds per step at 400 / 200 / 100 GB/s.
METHOD_1, METHOD_2 = "method 1 (tp)", "method 2 (pp+dp+zero)"
PAPER_STEP_S = {
    96: {METHOD_1: (316.32, 405.45, 584.28), METHOD_2: (238.10, 238.40, 239.06)},
    256: {METHOD_1: (123.21, 156.64, 224.10), METHOD_2: (100.81, 100.92, 101.22)},
}
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class SweepResult:
    name: str
    layout: Layout
    blocks: tuple[int, ...]
    bandwidths_gbps: tuple[float, ...]
    plans: tuple[PlanCost, ...]

    @property
    def step_times_s(self) -> tuple[float, ...]:
        return tuple(p.step_time_s for p in self.plans)

    @property
    def slowdown(self) -> float:
        """Step time at the lowest bandwidth over the step time at the highest."""
        times = dict(zip(self.bandwidths_gbps, self.step_times_s))
        return times[min(times)] / times[max(times)]


def flat_cluster(world: int, gbps: float, latency_s: float = 0.0) -> Cluster:
    """``world`` devices, 8 per node, every link at ``gbps``."""
    nodes = max(1, world // GPUS_PER_NODE)
    link = Link(gbps, latency_s)
    return Cluster(nodes, world // nodes, link, link)


def paper_layouts(world: int) -> dict[str, Layout]:
    """Method 1 and method 2 on ``world`` devices (a multiple of 32), as read above."""
    dp = world // 32
    return {
        METHOD_1: Layout(tp=8, pp=4, dp=dp, distributed=False),
        METHOD_2: Layout(tp=1, pp=32, dp=dp, distributed=True),
    }


def bandwidth_sweep(
    cfg: Config,
    name: str,
    layout: Layout,
    device: DevicePreset,
    clusters: Sequence[tuple[float, Cluster]],
    *,
    blocks: tuple[int, ...] | None = None,
    mfu: float = DEFAULT_MFU,
    flops_per_s: float | None = None,
) -> SweepResult:
    """``layout`` of ``cfg`` costed on each (bandwidth, cluster); ``blocks`` default to the
    config's split when it has one for this pp, else the even split."""
    resolved = apply_layout(cfg, layout, blocks)
    stages = layout.pp * layout.virtual_stages
    if blocks is None:
        given = cfg.parallel.pipeline_blocks
        if isinstance(given, tuple) and len(given) == stages:
            blocks = given
        else:
            blocks = uniform_blocks(cfg.model.num_layers, stages)
    plans = []
    for _, cluster in clusters:
        model = cost_model(resolved, device, mfu=mfu, flops_per_s=flops_per_s, cluster=cluster)
        plans.append(model.evaluate(blocks))
    return SweepResult(name, layout, tuple(blocks), tuple(b for b, _ in clusters), tuple(plans))


def paper_comparison(
    cfg: Config,
    device: DevicePreset,
    world: int = 96,
    bandwidths_gbps: Sequence[float] = PAPER_BANDWIDTHS_GBPS,
    *,
    mfu: float = DEFAULT_MFU,
) -> list[SweepResult]:
    """Both methods of the paper for ``cfg`` on ``world`` devices over ``bandwidths_gbps``."""
    clusters = [(bw, flat_cluster(world, bw)) for bw in bandwidths_gbps]
    return [
        bandwidth_sweep(cfg, name, layout, device, clusters, mfu=mfu)
        for name, layout in paper_layouts(world).items()
    ]
