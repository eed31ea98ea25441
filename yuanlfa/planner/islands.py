"""Islands joined by DiLoCo over the slow link, next to pipeline and data parallelism across it.

``parallel.islands: N`` splits the cluster's nodes into N islands (the outermost rank dimension:
an island is ``nodes / N`` whole nodes), each a full tp x pp x dp layout over its own links,
training on 1 / N of the global batch. Every ``H = outer.sync_every`` steps each rank
all-reduces its own shard of the parameters (the pseudo-gradient) with the ranks holding the
same shard in the other islands, over the inter-node link:

- the shard: 1 / dp of the rank's tp/pp piece (:class:`~.cost.RankCost` ``params``): the
  island's dp ranks hold equal parameters, so each exchanges a disjoint chunk and the island's
  dp group then all-gathers the updated piece over the island's own dp link (as
  ``yuanlfa.parallel.islands`` does), and the link carries each piece once per island;
- its bytes: ``dtype_bytes`` per element (fp32: 4; ``outer.quantize``: bf16, 2), sent as a ring
  all-reduce over the N islands, each rank on its own share of the inter-node link
  (:func:`yuanlfa.layout.traffic.ring_all_reduce_bytes` / :func:`~.links.ring_all_reduce_s`);
- plain DiLoCo blocks the step it runs in: a step costs the island's step + sync / H on average;
- Streaming DiLoCo sends F fragments (1 / F of the shard each) at staggered steps, each
  overlapped with ``fragment_delay`` steps of compute: a fragment costs only what its transfer
  exceeds that window, F times per H steps.

The island's step is the layout advisor's best layout of the island (:mod:`.advisor`) with the
island's devices and links and its share of the batch, holding DiLoCo's two extra fp32 copies of
its shard (the last synchronized parameters and the outer momentum) within the device memory.

Link bytes per step count what crosses nodes: per island (islands) or per node (synchronous
layouts), what its ranks send over inter-node links, averaged over steps. For a synchronous
layout: the dp rings' hops that join two nodes (reduce-scatter of the gradients, as the backend
sends it (:func:`.comm.reduce_scatter_bytes`: on gloo an all-reduce's bytes), and all-gather of
the parameters under the distributed optimizer, else an all-reduce), each pipeline boundary
between nodes (one activation per microbatch forward, its gradient back) and the tied
embedding's gradient sum; tensor parallelism across nodes is not counted (None).

Quality is not modelled: DiLoCo trades loss for traffic (the published figures: DiLoCo matched
synchronous training with 8 workers at 500x less communication; Streaming DiLoCo reports similar
loss at about 100x lower peak bandwidth), so the advice states the traffic and time only and
``benchmarks/islands_quality.py`` measures the loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from yuanlfa.config import Config, ConfigError
from yuanlfa.layout import group_ranks
from yuanlfa.layout.traffic import ring_all_reduce_bytes, ring_reduce_scatter_bytes
from yuanlfa.planner.advisor import Advice, Layout, Ranked, advise, snippet
from yuanlfa.planner.comm import reduce_scatter_bytes
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, DevicePreset
from yuanlfa.planner.links import ring_all_gather_s, ring_all_reduce_s
from yuanlfa.planner.params import param_counts
from yuanlfa.planner.topology import Cluster, parse_order

ALGORITHMS = ("diloco", "streaming_diloco")
DEFAULT_SYNC_EVERY = (10, 50)
# DiLoCo's extra state per shard element: the last synchronized parameters and the outer
# Nesterov momentum, both fp32.
OUTER_STATE_BYTES = 8
# outer.average_moments: each averaged moment (exp_avg, exp_avg_sq) goes over the link in fp32.
MOMENT_BYTES = 4
# outer.average_moments by the number of moments it averages.
MOMENTS = ("none", "first", "both")


@dataclass(frozen=True)
class Outer:
    """The outer loop as the ``outer:`` config section sets it (the parts that cost time)."""

    algorithm: str = "diloco"
    sync_every: int = 10
    fragments: int = 1
    fragment_delay: int = 0
    dtype_bytes: float = 4.0  # per exchanged element: fp32, or a quantized width
    # Inner AdamW moments averaged at each outer step (outer.average_moments: first 1, both 2),
    # each another fp32 value per parameter in the same exchange.
    moments: int = 0

    @property
    def bytes_per_param(self) -> float:
        """Bytes one exchange sends per parameter of a shard (before the ring's factor)."""
        return self.dtype_bytes + MOMENT_BYTES * self.moments

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"outer.algorithm: {self.algorithm!r} must be one of {ALGORITHMS}")
        if self.sync_every < 1:
            raise ConfigError(f"outer.sync_every: must be >= 1, got {self.sync_every}")
        if self.fragments < 1 or self.fragment_delay < 0:
            raise ConfigError(
                f"outer.fragments must be >= 1 and outer.fragment_delay >= 0, got "
                f"{self.fragments}, {self.fragment_delay}"
            )
        if self.algorithm == "diloco" and (self.fragments, self.fragment_delay) != (1, 0):
            raise ConfigError("outer.fragments / fragment_delay: only with streaming_diloco")
        if self.algorithm == "streaming_diloco" and self.fragment_delay >= self.sync_every:
            raise ConfigError(
                f"outer.fragment_delay: {self.fragment_delay} must be below sync_every "
                f"({self.sync_every})"
            )
        if not self.dtype_bytes > 0:
            raise ConfigError(f"outer bytes per element must be > 0, got {self.dtype_bytes}")
        if self.moments not in (0, 1, 2) or (self.moments and self.algorithm != "diloco"):
            raise ConfigError(
                f"outer.average_moments: {self.moments} moments; 0-2, with diloco only"
            )

    def describe(self) -> str:
        if self.algorithm == "diloco":
            moments = f" + {MOMENTS[self.moments]} moments" if self.moments else ""
            return f"DiLoCo H={self.sync_every}{moments}"
        return (
            f"streaming DiLoCo H={self.sync_every} F={self.fragments} delay={self.fragment_delay}"
        )


def outer_step_s(inner_s: float, sync_s: Callable[[float], float], outer: Outer) -> float:
    """Mean seconds per step of an island whose own step takes ``inner_s``; ``sync_s(share)``
    is one exchange of ``share`` of the shard (1: the whole shard)."""
    H = outer.sync_every
    if outer.algorithm == "diloco":
        return inner_s + sync_s(1.0) / H
    F = outer.fragments
    exposed = max(0.0, sync_s(1.0 / F) - outer.fragment_delay * inner_s)
    return inner_s + F * exposed / H


def shard_params(plan: PlanCost, dp: int) -> tuple[int, ...]:
    """Per pipeline rank: the parameters one rank exchanges with the other islands (its 1 / dp
    chunk of its tp/pp piece)."""
    return tuple(-(-r.params // dp) for r in plan.ranks)


def islands_link_bytes(plan: PlanCost, tp: int, dp: int, islands: int, outer: Outer) -> float:
    """Bytes one island sends to the others per step (averaged over the H steps of a sync):
    each of its tp x dp ranks per pipeline rank all-reduces its shard over the islands."""
    shards = shard_params(plan, dp)
    width = outer.bytes_per_param
    per_sync = tp * dp * sum(ring_all_reduce_bytes(s * width, islands) for s in shards)
    return per_sync / outer.sync_every


def _ring_crossings(cluster: Cluster, ranks: Sequence[int]) -> int:
    """Hops of a ring over ``ranks`` (in order) that join two nodes."""
    n = len(ranks)
    if n < 2:
        return 0
    return sum(cluster.node_of(ranks[i]) != cluster.node_of(ranks[(i + 1) % n]) for i in range(n))


def sync_link_bytes(model: CostModel, plan: PlanCost, cluster: Cluster) -> float | None:
    """Bytes per step one node sends to other nodes (the mean over nodes) for a synchronous
    layout costed as ``model`` / ``plan`` on ``cluster``; None when tp crosses nodes (not
    counted). See the module doc for what is counted."""
    cfg, p = model.cfg, model.cfg.parallel
    if "tp" in model.links.crossing:
        return None
    order = parse_order(p.rank_order)
    sizes = {"tp": model.tp, "dp": model.dp, "pp": model.pp}
    state, distributed = model.state, cfg.optim.distributed
    total = 0.0
    if model.dp > 1:
        # Each dp group shares a pipeline rank: pipeline slices list the ranks by pp coordinate.
        stage_of = {r: k for ranks in group_ranks(order, sizes, "pp") for k, r in enumerate(ranks)}
        for ranks in group_ranks(order, sizes, "dp"):
            params = plan.ranks[stage_of[ranks[0]]].params
            if distributed:
                per_hop = reduce_scatter_bytes(params * state.grads, model.dp, model.backend)
                per_hop += ring_reduce_scatter_bytes(params * state.weights, model.dp)
            else:
                per_hop = ring_all_reduce_bytes(params * state.grads, model.dp)
            total += _ring_crossings(cluster, ranks) * per_hop
    if model.pp > 1:
        spec = model.spec
        boundary = spec.dtype_bytes * cfg.model.hidden_size * spec.shard_tokens
        m = model.num_microbatches
        embed = param_counts(cfg.model).embedding // model.tp
        embed_bytes = ring_all_reduce_bytes(
            embed * state.grads / (model.dp if distributed else 1), 2
        )
        first, last = model.rank_of(0), model.rank_of(model.num_stages - 1)
        for ranks in group_ranks(order, sizes, "pp"):
            for s in range(model.num_stages - 1):
                a, b = model.rank_of(s), model.rank_of(s + 1)
                if a != b and cluster.node_of(ranks[a]) != cluster.node_of(ranks[b]):
                    total += 2 * m * boundary  # the activation forward, its gradient back
            tied = cfg.model.tie_embeddings and first != last
            if tied and cluster.node_of(ranks[first]) != cluster.node_of(ranks[last]):
                total += 2 * embed_bytes  # both ends send
    return total / cluster.nodes


@dataclass(frozen=True)
class IslandsCandidate:
    """N islands, each on its best layout, joined by an outer loop over the inter-node link."""

    islands: int
    outer: Outer
    inner: Ranked  # the island's layout (its cfg has the island's share of the batch)
    island_cluster: Cluster
    inner_step_s: float
    sync_s: float  # one whole exchange (the slowest pipeline rank), blocking
    step_time_s: float
    link_bytes_per_step: float  # per island
    memory_max_bytes: int  # with the outer state

    def describe(self) -> str:
        lay = self.inner.layout
        island = f"tp{lay.tp} pp{lay.pp} dp{lay.dp}"
        return f"{self.islands} islands x ({island}) + {self.outer.describe()}"


@dataclass(frozen=True)
class SyncCandidate:
    """A synchronous layout of the whole cluster, with what it sends over the inter-node link."""

    label: str  # "best", "pp across the link", "dp across the link"
    ranked: Ranked
    link_bytes_per_step: float | None  # per node

    @property
    def step_time_s(self) -> float:
        return self.ranked.step_time_s


@dataclass(frozen=True)
class Crossover:
    """Where ``islands`` beats the synchronous layouts by ``gain`` as the inter-node link's
    bandwidth varies (each layout kept and re-costed at other bandwidths)."""

    islands: IslandsCandidate
    gain: float  # the islands must be this much faster (their quality cost is paid always)
    # Bandwidth ranges (GB/s; None: unbounded within the search) where the islands win.
    wins: tuple[tuple[float | None, float | None], ...]
    wins_now: bool  # at the cluster's own link

    def describe(self) -> str:
        def gbit(gbps: float) -> str:
            return f"{gbps * 8:.3g} Gbit/s ({gbps:.3g} GB/s)"

        if not self.wins:
            return "never (in 1e-6 to 1e4 GB/s)"
        parts = []
        for lo, hi in self.wins:
            if lo is None and hi is None:
                parts.append("at every bandwidth (1e-6 to 1e4 GB/s)")
            elif lo is None:
                parts.append(f"below {gbit(hi)}")
            elif hi is None:
                parts.append(f"above {gbit(lo)}")
            else:
                parts.append(f"between {gbit(lo)} and {gbit(hi)}")
        return " or ".join(parts)


@dataclass(frozen=True)
class IslandsAdvice:
    sync: tuple[SyncCandidate, ...]
    islands: tuple[IslandsCandidate, ...]  # fastest first
    crossovers: tuple[Crossover, ...]
    skipped: dict[str, str]  # "N islands" -> why not


def island_cluster(cluster: Cluster, islands: int) -> Cluster:
    if islands < 2 or cluster.nodes % islands:
        raise ConfigError(
            f"parallel.islands: {islands} must be >= 2 and divide the {cluster.nodes} nodes "
            "(an island is a group of whole nodes)"
        )
    return dataclasses.replace(cluster, nodes=cluster.nodes // islands)


def island_config(cfg: Config, islands: int) -> Config:
    """``cfg`` for one island: its share of the global batch."""
    t = cfg.train
    if t.global_batch_size % islands:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} does not split over {islands} "
            "islands; use a multiple of parallel.islands"
        )
    return dataclasses.replace(
        cfg, train=dataclasses.replace(t, global_batch_size=t.global_batch_size // islands)
    )


def _costed(
    ranked: Ranked, cluster: Cluster, device: DevicePreset, options: dict
) -> tuple[CostModel, PlanCost]:
    model = cost_model(ranked.cfg, device, cluster=cluster, **options)
    return model, model.evaluate(ranked.blocks)


def as_ranked(
    cfg: Config, blocks: Sequence[int], cluster: Cluster, device: DevicePreset, options: dict
) -> Ranked:
    """A resolved ``cfg`` with its split ``blocks`` costed on ``cluster`` as the advisor would
    rank it (for layouts chosen by hand, as the benchmarks do)."""
    p = cfg.parallel
    layout = Layout(
        p.tp, p.pp, p.dp or 1, p.virtual_stages, p.schedule, cfg.train.recompute,
        cfg.optim.distributed, p.sequence_parallel, p.rank_order,
    )  # fmt: skip
    model = cost_model(cfg, device, cluster=cluster, **options)
    return Ranked(layout, model.evaluate(tuple(blocks)), model.links, cfg)


def islands_candidate(
    inner: Ranked,
    islands: int,
    outer: Outer,
    cluster: Cluster,
    device: DevicePreset,
    options: dict,
) -> IslandsCandidate:
    """``inner`` (a layout of one island, its cfg resolved) as N islands on ``cluster``."""
    sub = island_cluster(cluster, islands)
    model, plan = _costed(inner, sub, device, options)
    lay = inner.layout
    if outer.fragments > model.num_layers:
        raise ConfigError(
            f"outer.fragments: {outer.fragments} fragments for {model.num_layers} layers; use at "
            "most one fragment per layer"
        )
    shards = shard_params(plan, lay.dp)

    def sync_s(share: float) -> float:
        slowest = 0.0
        for rank, shard in zip(plan.ranks, shards):
            t = ring_all_reduce_s(shard * outer.bytes_per_param * share, islands, cluster.inter)
            if lay.dp > 1:  # the island's dp group regathers the piece
                t += ring_all_gather_s(
                    rank.params * model.state.weights * share, lay.dp, model.links.dp
                )
            slowest = max(slowest, t)
        return slowest

    memory = max(r.memory_bytes + OUTER_STATE_BYTES * s for r, s in zip(plan.ranks, shards))
    return IslandsCandidate(
        islands=islands,
        outer=outer,
        inner=inner,
        island_cluster=sub,
        inner_step_s=plan.step_time_s,
        sync_s=sync_s(1.0),
        step_time_s=outer_step_s(plan.step_time_s, sync_s, outer),
        link_bytes_per_step=islands_link_bytes(plan, lay.tp, lay.dp, islands, outer),
        memory_max_bytes=memory,
    )


def sync_candidates(advice: Advice, device: DevicePreset, options: dict) -> list[SyncCandidate]:
    """The best layout, and the best with pp (not dp, not tp) and with dp (not pp, not tp)
    across the inter-node link, from the advisor's list."""
    picks: dict[str, Ranked] = {}
    for r in advice.ranked:
        crossing = r.links.crossing
        if "best" not in picks:
            picks["best"] = r
        if crossing == {"pp"} and "pp across the link" not in picks:
            picks["pp across the link"] = r
        if crossing == {"dp"} and "dp across the link" not in picks:
            picks["dp across the link"] = r
    out = []
    for label, r in picks.items():
        model, plan = _costed(r, advice.cluster, device, options)
        out.append(SyncCandidate(label, r, sync_link_bytes(model, plan, advice.cluster)))
    return out


def _at_bandwidth(cluster: Cluster, gbps: float) -> Cluster:
    return dataclasses.replace(cluster, inter=dataclasses.replace(cluster.inter, gbps=gbps))


def sync_step_at(r: Ranked, cluster: Cluster, device: DevicePreset, options: dict) -> float:
    return _costed(r, cluster, device, options)[1].step_time_s


def islands_step_at(
    c: IslandsCandidate, cluster: Cluster, device: DevicePreset, options: dict
) -> float:
    return islands_candidate(c.inner, c.islands, c.outer, cluster, device, options).step_time_s


def crossover(
    c: IslandsCandidate,
    sync: Sequence[SyncCandidate],
    cluster: Cluster,
    device: DevicePreset,
    options: dict,
    gain: float = 0.0,
    lo_gbps: float = 1e-6,
    hi_gbps: float = 1e4,
) -> Crossover:
    """The inter-node bandwidth at which the fastest of ``sync`` takes ``1 + gain`` times as
    long as ``c`` (each layout kept, re-costed at that bandwidth): a log-spaced scan, then
    bisection. DiLoCo sends less than any synchronous layout, so with ``gain`` 0 the islands
    are never slower where one island holds what a synchronous replica holds; ``gain`` asks
    what they must save to be worth their loss in quality."""

    def gap(gbps: float) -> float:
        at = _at_bandwidth(cluster, gbps)
        best = min(sync_step_at(s.ranked, at, device, options) for s in sync)
        return (1 + gain) * islands_step_at(c, at, device, options) - best

    wins_now = gap(cluster.inter.gbps) < 0
    points = [lo_gbps * (hi_gbps / lo_gbps) ** (i / 40) for i in range(41)]
    gaps = [gap(x) for x in points]
    edges: list[float] = []
    for i in range(len(points) - 1):
        if (gaps[i] < 0) != (gaps[i + 1] < 0):
            a, b, low_wins = points[i], points[i + 1], gaps[i] < 0
            for _ in range(60):
                mid = math.sqrt(a * b)
                if (gap(mid) < 0) == low_wins:
                    a = mid
                else:
                    b = mid
            edges.append(math.sqrt(a * b))
    # The winning ranges between the edges, starting from the lowest bandwidth's side.
    bounds: list[float | None] = [None, *edges, None]
    winning = gaps[0] < 0
    wins = []
    for lo, hi in zip(bounds, bounds[1:]):
        if winning:
            wins.append((lo, hi))
        winning = not winning
    return Crossover(c, gain, tuple(wins), wins_now)


def advise_islands(
    cfg: Config,
    advice: Advice,
    device: DevicePreset,
    *,
    sync_every: Sequence[int] = DEFAULT_SYNC_EVERY,
    islands: Sequence[int] | None = None,
    fragments: int = 0,
    fragment_delay: int = 1,
    dtype_bytes: float = 4.0,
    moments: int = 0,
    gain: float = 0.1,
    mfu: float = DEFAULT_MFU,
    flops_per_s: float | None = None,
    memory_limit_bytes: int | None = None,
    tokenizer_vocab: int | None = None,
) -> IslandsAdvice:
    """Islands (each divisor N >= 2 of the nodes, or ``islands``) with DiLoCo every H of
    ``sync_every`` steps (and Streaming DiLoCo with ``fragments`` > 0), next to the advisor's
    synchronous layouts across the inter-node link (``advice`` for ``cfg``, loaded, on its
    cluster). ``gain``: how much faster the islands must be to be advised (see
    :func:`crossover`)."""
    if gain < 0:
        raise ConfigError(f"--islands-gain: must be >= 0, got {gain}")
    cluster = advice.cluster
    if not sync_every or min(sync_every) < 1:
        raise ConfigError(f"--sync-every: each H must be >= 1, got {list(sync_every)}")
    if fragments > cfg.model.num_layers:
        raise ConfigError(
            f"--fragments: {fragments} fragments for model.num_layers={cfg.model.num_layers}; "
            "use at most one fragment per layer"
        )
    options = {"mfu": mfu, "flops_per_s": flops_per_s, "memory_limit_bytes": memory_limit_bytes}
    sync = sync_candidates(advice, device, options)
    counts = islands if islands is not None else [n for n in range(2, cluster.nodes + 1)
                                                  if cluster.nodes % n == 0]  # fmt: skip
    outers = [Outer("diloco", h, dtype_bytes=dtype_bytes, moments=moments) for h in sync_every]
    if fragments and not moments:  # averaged moments: plain DiLoCo only
        outers += [
            Outer("streaming_diloco", h, fragments, fragment_delay, dtype_bytes) for h in sync_every
        ]
    limit = memory_limit_bytes if memory_limit_bytes is not None else device.memory_bytes
    found: list[IslandsCandidate] = []
    skipped: dict[str, str] = {}
    for n in counts:
        try:
            sub = island_cluster(cluster, n)
            inner_advice = advise(
                island_config(cfg, n), sub, device, top=5, mfu=mfu, flops_per_s=flops_per_s,
                memory_limit_bytes=memory_limit_bytes, tokenizer_vocab=tokenizer_vocab,
            )  # fmt: skip
        except ConfigError as exc:
            skipped[f"{n} islands"] = str(exc).split(";")[0]
            continue
        for outer in outers:
            fitting = [
                c
                for c in (
                    islands_candidate(r, n, outer, cluster, device, options)
                    for r in inner_advice.ranked
                )
                if c.memory_max_bytes <= limit
            ]
            if not fitting:
                skipped[f"{n} islands"] = "no island layout leaves room for DiLoCo's outer state"
                continue
            found.append(min(fitting, key=lambda c: c.step_time_s))
    found.sort(key=lambda c: (c.step_time_s, c.link_bytes_per_step))
    crossovers = tuple(crossover(c, sync, cluster, device, options, gain) for c in found)
    return IslandsAdvice(tuple(sync), tuple(found), crossovers, skipped)


def islands_snippet(c: IslandsCandidate) -> dict:
    """The config keys of ``c``: the island's layout (as the advisor prints it, dp per island)
    with ``parallel.islands`` and the ``outer`` section."""
    out = snippet(c.inner)
    out["parallel"] = {"islands": c.islands, **out["parallel"]}
    outer: dict = {"algorithm": c.outer.algorithm, "sync_every": c.outer.sync_every}
    if c.outer.algorithm == "streaming_diloco":
        outer.update(fragments=c.outer.fragments, fragment_delay=c.outer.fragment_delay)
    if c.outer.dtype_bytes == 2:
        outer["quantize"] = True  # bf16 pseudo-gradients
    if c.outer.moments:
        outer["average_moments"] = MOMENTS[c.outer.moments]
    out["outer"] = outer
    return out
