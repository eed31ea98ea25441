"""Text and JSON forms of the advisor's ranking and of bandwidth sweeps (for yuanlfa-plan)."""

from __future__ import annotations

import yaml

from yuanlfa.planner.advisor import Advice, Ranked, snippet
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


def format_advice(advice: Advice, device: str) -> str:
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
