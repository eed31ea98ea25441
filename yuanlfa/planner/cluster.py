"""A heterogeneous cluster: node groups of different device kinds, and which pipeline ranks run
on which device.

Global ranks fill the groups in the order they are listed (``cluster.groups`` of the config),
node by node, so the rank order (:mod:`yuanlfa.layout.ranks`) decides the device of each tp /
dp / pp coordinate. A pipeline rank is as fast as the slowest device among its tp x dp ranks
(its tp collectives and the dp reduction wait for the slowest) and holds as much as the
smallest one: :func:`pipeline_devices` gives that device per pipeline rank, which the cost
model and the balancer use for the rank's speed and memory limit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from yuanlfa.config import ClusterConfig, ConfigError, NodeGroupConfig
from yuanlfa.layout import group_ranks
from yuanlfa.planner.devices import GIB, DevicePreset, device_names, find_device
from yuanlfa.planner.links import Link
from yuanlfa.planner.topology import parse_order


@dataclass(frozen=True)
class DeviceGroup:
    device: DevicePreset
    nodes: int
    per_node: int
    intra: Link
    label: str  # the config's device name

    @property
    def devices(self) -> int:
        return self.nodes * self.per_node


@dataclass(frozen=True)
class MixedCluster:
    """Node groups (in rank order) joined by one inter-node link per device."""

    groups: tuple[DeviceGroup, ...]
    inter: Link

    @property
    def world_size(self) -> int:
        return sum(g.devices for g in self.groups)

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    def _locate(self, rank: int) -> tuple[int, int]:
        """(group index, node index) of global ``rank``."""
        node = 0
        for i, g in enumerate(self.groups):
            if rank < g.devices:
                return i, node + rank // g.per_node
            rank -= g.devices
            node += g.nodes
        raise ConfigError(f"rank {rank}: beyond the cluster's {self.world_size} devices")

    def node_of(self, rank: int) -> int:
        return self._locate(rank)[1]

    def group_of(self, rank: int) -> int:
        return self._locate(rank)[0]

    def device_of(self, rank: int) -> DevicePreset:
        return self.groups[self.group_of(rank)].device

    def intra_of(self, node: int) -> Link:
        for g in self.groups:
            if node < g.nodes:
                return g.intra
            node -= g.nodes
        raise ConfigError(f"node {node}: beyond the cluster's {self.nodes} nodes")

    def describe(self) -> str:
        return " + ".join(f"{g.nodes} x {g.per_node} {g.label}" for g in self.groups)

    def reordered(self, order: tuple[int, ...]) -> MixedCluster:
        """The same devices with the groups in ``order`` (which kind gets the first ranks)."""
        return MixedCluster(tuple(self.groups[i] for i in order), self.inter)

    def group_orders(self) -> list[tuple[int, ...]]:
        """Every order of the distinct groups (permutations that only swap identical groups
        are left out)."""
        seen, out = set(), []
        for perm in itertools.permutations(range(len(self.groups))):
            key = tuple(self.groups[i] for i in perm)
            if key not in seen:
                seen.add(key)
                out.append(perm)
        return out

    @property
    def homogeneous(self) -> bool:
        return len({g.device for g in self.groups}) == 1


def group_device(group: NodeGroupConfig, index: int) -> DevicePreset:
    """The device of one ``cluster.groups`` entry: a preset with the explicit figures applied,
    or a custom kind given by memory_gib and tflops."""
    preset = find_device(group.device)
    key = f"cluster.groups[{index}]"
    if preset is None:
        if group.memory_gib is None or group.tflops is None:
            raise ConfigError(
                f"{key}.device: {group.device!r} is not a known device kind; use one of "
                f"{device_names()}, or give {key}.memory_gib and {key}.tflops"
            )
        # A custom part: PCIe 4.0 x16 between devices unless intra_gbps says otherwise.
        preset = DevicePreset(group.device, group.tflops * 1e12, int(group.memory_gib * GIB), 32.0)
    return DevicePreset(
        preset.name if group.memory_gib is None and group.tflops is None else group.device,
        preset.peak_flops if group.tflops is None else group.tflops * 1e12,
        preset.memory_bytes if group.memory_gib is None else int(group.memory_gib * GIB),
        preset.link_gbps if group.intra_gbps is None else group.intra_gbps,
        preset.gpu,
    )


def mixed_cluster(cc: ClusterConfig) -> MixedCluster:
    """The cluster a config describes; ConfigError on an unknown device kind or no groups."""
    if not cc.groups:
        raise ConfigError("cluster.groups: empty; list the node groups (device, nodes, ...)")
    groups = []
    for i, g in enumerate(cc.groups):
        device = group_device(g, i)
        intra = Link(device.link_gbps, cc.intra_latency_us * 1e-6)
        groups.append(DeviceGroup(device, g.nodes, g.devices_per_node, intra, g.device))
    return MixedCluster(tuple(groups), Link(cc.inter_gbps, cc.inter_latency_us * 1e-6))


def check_world(cluster: MixedCluster, tp: int, pp: int, dp: int) -> None:
    world = tp * pp * dp
    if world != cluster.world_size:
        fix = (
            f"set parallel.dp={cluster.world_size // (tp * pp)}"
            if cluster.world_size % (tp * pp) == 0
            else "change parallel.tp / parallel.pp to divide it, or the groups' nodes"
        )
        raise ConfigError(
            f"cluster: {cluster.describe()} = {cluster.world_size} devices but tp * pp * dp = "
            f"{tp} * {pp} * {dp} = {world}; {fix}"
        )


def pipeline_devices(
    cluster: MixedCluster, tp: int, pp: int, dp: int, rank_order: str
) -> tuple[DevicePreset, ...]:
    """Per pipeline rank: the device it runs at (the slowest peak and the smallest memory of its
    tp x dp ranks; one kind when they agree)."""
    check_world(cluster, tp, pp, dp)
    order = parse_order(rank_order)
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    slices = group_ranks(order, sizes, "pp")  # one list of pp ranks per tp/dp coordinate
    out = []
    for r in range(pp):
        kinds = {cluster.device_of(ranks[r]) for ranks in slices}
        if len(kinds) == 1:
            out.append(kinds.pop())
            continue
        slow = min(kinds, key=lambda d: d.peak_flops)
        small = min(kinds, key=lambda d: d.memory_bytes)
        out.append(
            DevicePreset(
                "/".join(sorted(d.name for d in kinds)),
                slow.peak_flops,
                small.memory_bytes,
                min(d.link_gbps for d in kinds),
                slow.gpu,
            )
        )
    return tuple(out)


def tp_mixed(cluster: MixedCluster, tp: int, pp: int, dp: int, rank_order: str) -> bool:
    """Whether some tensor-parallel group spans two device kinds or two nodes (tp belongs
    inside one homogeneous node's fast links)."""
    if tp == 1:
        return False
    order = parse_order(rank_order)
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    for ranks in group_ranks(order, sizes, "tp"):
        if len({cluster.device_of(r) for r in ranks}) > 1:
            return True
        if len({cluster.node_of(r) for r in ranks}) > 1:
            return True
    return False
