"""Which link each kind of traffic uses: nodes, devices per node, and the rank order.

Global rank r runs on node r // gpus_per_node. ``parallel.rank_order`` lists the dimensions
fastest-varying first (default "tp-dp-pp": the tp ranks of a group are consecutive, so a tp
group of at most gpus_per_node ranks stays inside a node). A tensor- or data-parallel group
uses the intra-node link when every one of its groups lies inside one node, else the inter-node
one (a ring runs at its slowest hop). Pipeline traffic is costed per boundary between pipeline
ranks r and r + 1 (and pp - 1 -> 0 for the interleaved schedules' wrap-around, and the tied
embedding's gradient between the first and last rank): inter-node when any tp/dp slice has the
two ranks on different nodes, since every slice moves the same bytes at the same time and the
slowest one sets the pace.

``inter`` is what one device gets across nodes (its own NIC, or its share of the node's).
"""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import ConfigError
from yuanlfa.layout import DIMS, group_ranks
from yuanlfa.planner.links import Link


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node: must be >= 1, got {self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def intra_of(self, node: int) -> Link:
        """The link between two devices of ``node``."""
        return self.intra

    def describe(self) -> str:
        return f"{self.nodes} nodes x {self.gpus_per_node} devices"


@dataclass(frozen=True)
class LinkPlan:
    """The link of each kind of traffic of one layout."""

    tp: Link
    dp: Link
    p2p: tuple[Link, ...]  # p2p[r]: between pipeline ranks r and (r + 1) % pp
    embed: Link  # pipeline rank 0 <-> pp - 1 (the tied embedding's gradient)
    crossing: frozenset[str] = frozenset()  # of tp, dp, pp: the ones using inter-node links

    def between(self, a: int, b: int) -> Link:
        """The link joining neighbouring pipeline ranks ``a`` and ``b`` (either direction: a
        V-shaped placement sends from rank r to r - 1 on its way back)."""
        return self.p2p[a if b == (a + 1) % len(self.p2p) else b]


def uniform_links(p2p: Link, tp: Link, dp: Link, pp: int) -> LinkPlan:
    """Every boundary on one link (no topology: the planner's links given per dimension)."""
    return LinkPlan(tp=tp, dp=dp, p2p=(p2p,) * pp, embed=p2p)


def parse_order(order: str) -> tuple[str, ...]:
    dims = tuple(order.split("-"))
    if sorted(dims) != sorted(DIMS):
        raise ConfigError(f"parallel.rank_order: {order!r} must name tp, dp and pp once each")
    return dims


def group_crosses_nodes(cluster: Cluster, order: tuple[str, ...], sizes: dict, dim: str) -> bool:
    """Whether any ``dim`` group has ranks on more than one node."""
    return any(
        len({cluster.node_of(r) for r in ranks}) > 1 for ranks in group_ranks(order, sizes, dim)
    )


def pair_crosses_nodes(
    cluster: Cluster, order: tuple[str, ...], sizes: dict, a: int, b: int
) -> bool:
    """Whether pipeline ranks ``a`` and ``b`` of some tp/dp slice lie on different nodes."""
    return any(
        cluster.node_of(ranks[a]) != cluster.node_of(ranks[b])
        for ranks in group_ranks(order, sizes, "pp")
    )


def _intra(cluster, groups: list[list[int]]) -> Link:
    """The slowest intra-node link among the nodes the groups use (a mixed cluster's node
    kinds may differ; every group of a dimension moves the same bytes at once)."""
    nodes = {cluster.node_of(r) for ranks in groups for r in ranks}
    return min((cluster.intra_of(n) for n in sorted(nodes)), key=lambda link: link.gbps)


def link_plan(cluster, tp: int, pp: int, dp: int, rank_order: str) -> LinkPlan:
    """The links of a tp x pp x dp layout on ``cluster`` with ``rank_order``."""
    if tp * pp * dp != cluster.world_size:
        raise ConfigError(
            f"tp * pp * dp = {tp} * {pp} * {dp} = {tp * pp * dp} but the cluster has "
            f"{cluster.describe()} = {cluster.world_size}"
        )
    order = parse_order(rank_order)
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    intra = {d: _intra(cluster, group_ranks(order, sizes, d)) for d in ("tp", "dp")}
    slices = group_ranks(order, sizes, "pp")

    def pick(crosses: bool, dim: str) -> Link:
        return cluster.inter if crosses else intra[dim]

    def pair(a: int, b: int) -> Link:
        """Pipeline ranks a and b: inter-node if any slice crosses, else their nodes' link."""
        if pp > 1 and pair_crosses_nodes(cluster, order, sizes, a, b):
            return cluster.inter
        return _intra(cluster, [[ranks[a], ranks[b]] for ranks in slices])

    crossing = {d for d in ("tp", "dp") if group_crosses_nodes(cluster, order, sizes, d)}
    p2p = []
    for r in range(pp):
        crosses = pp > 1 and pair_crosses_nodes(cluster, order, sizes, r, (r + 1) % pp)
        p2p.append(pair(r, (r + 1) % pp))
        if crosses and r < pp - 1:
            crossing.add("pp")
    embed = pair(0, pp - 1)
    return LinkPlan(
        tp=pick("tp" in crossing, "tp"),
        dp=pick("dp" in crossing, "dp"),
        p2p=tuple(p2p),
        embed=embed,
        crossing=frozenset(crossing),
    )
