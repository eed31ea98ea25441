"""Text and JSON forms of the advisor's ranking and of bandwidth sweeps (for yuanlfa-plan)."""

from __future__ import annotations

import yaml

from yuanlfa.planner.advisor import Advice, Ranked, snippet
from yuanlfa.planner.islands import IslandsAdvice, islands_snippet
from yuanlfa.planner.topology import Cluster
from yuanlfa.planner.weak_link import PAPER_STEP_S, SweepResult

GIB = 2**30


def _crossing(r: Ranked) -> str:
    """Which parallel dimensions use inter-node links."""
    dims = [d for d in ("tp", "pp", "dp") if d in r.links.crossing]
    return "+".join(dims) if dims else "-"


def _blocks(blocks: tuple[int, ...]) -> str:
    text = ",".join(map(str, blocks))
    return text if len(text) <= 24 else text[:21] + "..."


def snippet_yaml(r: Ranked) -> str:
    return yaml.safe_dump(snippet(r), sort_keys=False, default_flow_style=None, width=100)


def format_advice(advice: Advice, device: str, before_snippet: str | None = None) -> str:
    """The ranking, then ``before_snippet`` (the islands section), then the best layout's
    snippet last (scripts read it as the YAML that ends the output)."""
    c = advice.cluster
    lines = [
        f"{c.nodes} nodes x {c.gpus_per_node} {device} | intra-node {c.intra.gbps:g} GB/s + "
        f"{c.intra.latency_s * 1e6:g} us, inter-node {c.inter.gbps:g} GB/s + "
        f"{c.inter.latency_s * 1e6:g} us per message",
        f"{advice.considered} layouts, {advice.balanced} balanced (the rest cannot beat the "
        f"list below), rejected: "
        + (", ".join(f"{k} ({n})" for k, n in sorted(advice.rejected.items())) or "none"),
        "",
    ]
    best = advice.best.step_time_s
    head = (
        f"{'#':>2} {'step s':>9} {'x best':>6} {'tp':>3} {'pp':>3} {'dp':>3} {'schedule':<19} "
        f"{'recompute':<9} {'zero':<4} {'sp':<3} {'order':<8} {'inter-node':<10} "
        f"{'mem GiB':>7} {'bubble':>6} {'dp+sync s':>9}  blocks"
    )
    lines.append(head)
    for i, r in enumerate(advice.ranked, 1):
        lay, plan = r.layout, r.plan
        schedule = lay.schedule if lay.pp > 1 else "-"
        if lay.virtual_stages > 1:
            schedule += f" v{lay.virtual_stages}"
        zero, sp = ("yes" if flag else "no" for flag in (lay.distributed, lay.sequence_parallel))
        lines.append(
            f"{i:>2} {r.step_time_s:>9.4g} {r.step_time_s / best:>6.2f} {lay.tp:>3} {lay.pp:>3} "
            f"{lay.dp:>3} {schedule:<19} {lay.recompute:<9} {zero:<4} {sp:<3} {lay.rank_order:<8} "
            f"{_crossing(r):<10} {plan.memory_max_bytes / GIB:>7.1f} "
            f"{plan.bubble_fraction:>6.3f} {plan.step_comm_s:>9.3g}  {_blocks(plan.blocks)}"
        )
    if before_snippet:
        lines += ["", before_snippet]
    lines += ["", "best layout, to merge into the config:", snippet_yaml(advice.best).rstrip()]
    return "\n".join(lines)


def advice_to_dict(advice: Advice) -> dict:
    return {
        "cluster": {
            "nodes": advice.cluster.nodes,
            "gpus_per_node": advice.cluster.gpus_per_node,
            "intra": {
                "gbps": advice.cluster.intra.gbps,
                "latency_s": advice.cluster.intra.latency_s,
            },
            "inter": {
                "gbps": advice.cluster.inter.gbps,
                "latency_s": advice.cluster.inter.latency_s,
            },
        },
        "considered": advice.considered,
        "balanced": advice.balanced,
        "rejected": advice.rejected,
        "ranked": [
            {
                "step_time_s": r.step_time_s,
                "pipeline_s": r.plan.pipeline_s,
                "step_comm_s": r.plan.step_comm_s,
                "bubble_fraction": r.plan.bubble_fraction,
                "memory_max_bytes": r.plan.memory_max_bytes,
                "inter_node": sorted(r.links.crossing),
                "blocks": list(r.blocks),
                "layout": {
                    "tp": r.layout.tp,
                    "pp": r.layout.pp,
                    "dp": r.layout.dp,
                    "virtual_stages": r.layout.virtual_stages,
                    "schedule": r.layout.schedule,
                    "recompute": r.layout.recompute,
                    "distributed_optimizer": r.layout.distributed,
                    "sequence_parallel": r.layout.sequence_parallel,
                    "rank_order": r.layout.rank_order,
                },
                "snippet": snippet(r),
            }
            for r in advice.ranked
        ],
    }


QUALITY_NOTE = (
    "quality is not modelled: islands trade loss for traffic (published: DiLoCo matched "
    "synchronous training with 8 workers at 500x less communication; Streaming DiLoCo reports "
    "similar loss at ~100x lower peak bandwidth); measure yours with "
    "benchmarks/islands_quality.py"
)


def _mb(nbytes: float | None) -> str:
    return "n/a (tp)" if nbytes is None else f"{nbytes / 1e6:.4g}"


def format_islands(ia: IslandsAdvice, cluster: Cluster) -> str:
    """The islands next to pp and dp across the inter-node link, and when each wins."""
    link = cluster.inter
    lines = [
        f"across the inter-node link ({link.gbps:g} GB/s = {link.gbps * 8:g} Gbit/s per device): "
        "link MB per step sent by one node (synchronous) or one island",
        f"{'candidate':<64} {'step s':>9} {'link MB/step':>12}",
    ]
    for s in ia.sync:
        lay = s.ranked.layout
        desc = f"{s.label}: tp{lay.tp} pp{lay.pp} dp{lay.dp}"
        if lay.pp > 1:
            desc += f" {lay.schedule}" + (
                f" v{lay.virtual_stages}" if lay.virtual_stages > 1 else ""
            )
        desc += " ZeRO-1" if lay.distributed else ""
        lines.append(f"{desc[:64]:<64} {s.step_time_s:>9.4g} {_mb(s.link_bytes_per_step):>12}")
    for c in ia.islands:
        lines.append(
            f"{c.describe()[:64]:<64} {c.step_time_s:>9.4g} {_mb(c.link_bytes_per_step):>12}"
        )
    for n, why in sorted(ia.skipped.items()):
        lines.append(f"{n}: not possible: {why}")
    if not ia.islands:
        return "\n".join(lines)
    gain = ia.crossovers[0].gain
    lines += [
        "",
        f"when the islands win (at least {gain:.0%} faster than the synchronous layouts above, "
        "each re-costed at the other bandwidths):",
    ]
    for x in ia.crossovers:
        here = "yes" if x.wins_now else "no"
        lines.append(f"- {x.islands.describe()}: {x.describe()}; at this link: {here}")
    lines.append(f"({QUALITY_NOTE})")
    best = next((x.islands for x in ia.crossovers if x.wins_now), None)
    if best is not None:
        text = yaml.safe_dump(
            islands_snippet(best), sort_keys=False, default_flow_style=None, width=100
        )
        lines += ["", "islands layout (if its loss is acceptable):", text.rstrip()]
    return "\n".join(lines)


def islands_to_dict(ia: IslandsAdvice, cluster: Cluster) -> dict:
    return {
        "link_gbps": cluster.inter.gbps,
        "quality": QUALITY_NOTE,
        "sync": [
            {
                "label": s.label,
                "layout": s.ranked.layout.describe(),
                "step_time_s": s.step_time_s,
                "link_bytes_per_step": s.link_bytes_per_step,
                "inter_node": sorted(s.ranked.links.crossing),
                "snippet": snippet(s.ranked),
            }
            for s in ia.sync
        ],
        "candidates": [
            {
                "islands": x.islands.islands,
                "algorithm": x.islands.outer.algorithm,
                "sync_every": x.islands.outer.sync_every,
                "fragments": x.islands.outer.fragments,
                "fragment_delay": x.islands.outer.fragment_delay,
                "outer_bytes_per_param": x.islands.outer.dtype_bytes,
                "island_layout": x.islands.inner.layout.describe(),
                "inner_step_s": x.islands.inner_step_s,
                "sync_s": x.islands.sync_s,
                "step_time_s": x.islands.step_time_s,
                "link_bytes_per_step": x.islands.link_bytes_per_step,
                "memory_max_bytes": x.islands.memory_max_bytes,
                "gain": x.gain,
                "wins_gbps": [list(r) for r in x.wins],
                "wins_now": x.wins_now,
                "wins": x.describe(),
                "snippet": islands_snippet(x.islands),
            }
            for x in ia.crossovers
        ],
        "skipped": ia.skipped,
    }


def format_sweeps(results: list[SweepResult], world: int, labels: list[str]) -> str:
    """Step times per bandwidth (columns ``labels``), with the paper's figures under each
    method when the columns are the paper's 400 / 200 / 100."""
    lines = [f"{'method':<22} {'layout':<20}" + "".join(f" {b:>12}" for b in labels) + "  slowdown"]
    for r in results:
        lay = r.layout
        desc = f"tp{lay.tp} pp{lay.pp} dp{lay.dp}" + (" ZeRO-1" if lay.distributed else "")
        times = "".join(f" {t:>12.2f}" for t in r.step_times_s)
        lines.append(f"{r.name:<22} {desc:<20}{times} {r.slowdown:>8.3f}x")
        paper = PAPER_STEP_S.get(world, {}).get(r.name)
        if paper is not None and [b.split()[0] for b in labels] == ["400", "200", "100"]:
            figures = "".join(f" {t:>12.2f}" for t in paper)
            lines.append(f"{'  the paper':<22} {'':<20}{figures} {paper[-1] / paper[0]:>8.3f}x")
    return "\n".join(lines)
