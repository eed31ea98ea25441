"""The planner's answer for a mixed cluster: 2 nodes x 8 H100-80G + 2 nodes x 8 A100-40G, 100
Gbit/s (12.5 GB/s) per device between nodes, for the Yuan 2.0 51B and 102B presets.

For each preset (the preset's model, batch and precision; layout free):

- ``aware``: the heterogeneous advisor's best layout (yuanlfa.planner.advisor_mixed): tp x pp x
  dp, which device group runs the first stages, rank order, split and recompute per pipeline
  rank, with each rank's memory against its own device's limit;
- ``homogeneous``: the best plan of the homogeneous advisor (yuanlfa.planner.advisor) when it
  must assume every device is the weakest one (A100-40G: the speed and memory every rank is
  sure to have), re-costed on the real devices (H100 groups first, as the cluster lists them);
- ``homogeneous_h100``: the same when it assumes every device is an H100-80G (the optimistic
  homogeneous plan): its step time on the real devices, and whether it fits them.

Prediction only (the cost model, mfu 0.45); no device is needed.

    python benchmarks/heterogeneous_plan.py --out benchmarks/results/heterogeneous_plan
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yuanlfa.config import config_from_dict, load_config  # noqa: E402
from yuanlfa.planner.advisor import advise, snippet  # noqa: E402
from yuanlfa.planner.advisor_mixed import advise_mixed, stage_table  # noqa: E402
from yuanlfa.planner.cluster import mixed_cluster  # noqa: E402
from yuanlfa.planner.cost import cost_model  # noqa: E402
from yuanlfa.planner.devices import GIB, get_device  # noqa: E402
from yuanlfa.planner.links import Link  # noqa: E402
from yuanlfa.planner.topology import Cluster  # noqa: E402


def cluster_dict(nodes: int) -> dict:
    """``nodes`` nodes of 8 H100-80G and as many of 8 A100-40G, 100 Gbit/s between nodes."""
    return {
        "groups": [
            {"device": "h100-80g", "nodes": nodes, "devices_per_node": 8},
            {"device": "a100-40g", "nodes": nodes, "devices_per_node": 8},
        ],
        "inter_gbps": 12.5,  # 100 Gbit/s
        "inter_latency_us": 10.0,
        "intra_latency_us": 5.0,
    }


# (preset, nodes per group): the cluster for both presets, and 102B (which does not fit
# it) on twice the nodes.
CASES = (("yuan2-51b", 2), ("yuan2-102b", 2), ("yuan2-102b", 4))


def load(preset: str, nodes: int):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ["parallel.dp=null"])
    cluster_cfg = config_from_dict({"cluster": cluster_dict(nodes)}).cluster
    return dataclasses.replace(cfg, cluster=cluster_cfg)


def recost(ranked, cluster, nodes: int) -> dict:
    """A homogeneous advisor's layout, costed on the mixed devices (groups as listed)."""
    mixed = config_from_dict({"cluster": cluster_dict(nodes)}).cluster
    cfg = dataclasses.replace(ranked.cfg, cluster=mixed)
    model = cost_model(cfg, cluster=cluster)
    plan = model.evaluate(ranked.blocks)
    modes = cfg.train.recompute_stages or (cfg.train.recompute,) * model.pp
    return {
        "layout": ranked.layout.describe(),
        "blocks": list(ranked.blocks),
        "predicted_on_assumed_s": ranked.step_time_s,
        "step_time_s": plan.step_time_s,
        "fits": plan.fits,
        "stages": [
            {
                "pipeline_rank": r.rank,
                "device": model.device_of(r.rank).name,
                "layers": r.layers,
                "recompute": modes[r.rank],
                "memory_gib": r.memory_bytes / GIB,
                "limit_gib": plan.limit_of(r.rank) / GIB,
            }
            for r in plan.ranks
        ],
    }


def homogeneous(cfg, device_name: str, cluster, nodes: int) -> dict:
    c = cluster_dict(nodes)
    inter = Link(c["inter_gbps"], c["inter_latency_us"] * 1e-6)
    device = get_device(device_name)
    flat = Cluster(2 * nodes, 8, Link(device.link_gbps, c["intra_latency_us"] * 1e-6), inter)
    try:
        best = advise(dataclasses.replace(cfg, cluster=type(cfg.cluster)()), flat, device, top=1)
    except Exception as exc:  # a ConfigError: no layout fits that assumption
        return {"assumed_device": device_name, "error": str(exc)}
    return {"assumed_device": device_name, **recost(best.best, cluster, nodes)}


def run(preset: str, nodes: int) -> dict:
    cfg = load(preset, nodes)
    cluster = mixed_cluster(cfg.cluster)
    start = time.perf_counter()
    try:
        advice = advise_mixed(cfg, cluster, top=3)
    except Exception as exc:
        aware = {"error": str(exc)}
    else:
        best = advice.best
        aware = {
            "layout": best.layout.describe(),
            "blocks": list(best.blocks),
            "recompute_stages": list(best.cfg.train.recompute_stages),
            "step_time_s": best.step_time_s,
            "fits": best.plan.fits,
            "stages": stage_table(best),
            "snippet": snippet(best),
            "runner_up": [
                {"layout": r.layout.describe(), "step_time_s": r.step_time_s}
                for r in advice.ranked[1:]
            ],
            "considered": advice.considered,
            "balanced": advice.balanced,
        }
    aware["advisor_s"] = time.perf_counter() - start
    out = {
        "preset": preset,
        "cluster": cluster.describe(),
        "aware": aware,
        "homogeneous": homogeneous(cfg, "A100-40GB", cluster, nodes),
        "homogeneous_h100": homogeneous(cfg, "H100-SXM", cluster, nodes),
    }
    h = out["homogeneous"]
    if "step_time_s" in aware and "step_time_s" in h and h["fits"]:
        out["speedup_vs_homogeneous"] = h["step_time_s"] / aware["step_time_s"]
    return out


def markdown(results: list[dict]) -> str:
    lines = [
        "# Mixed clusters: H100-80G and A100-40G nodes (8 each), 100 Gbit/s between nodes",
        "",
        "`python benchmarks/heterogeneous_plan.py --out benchmarks/results/heterogeneous_plan`"
        " (cost model, mfu 0.45; predictions, not measurements).",
        "",
    ]
    for r in results:
        a, h, o = r["aware"], r["homogeneous"], r["homogeneous_h100"]
        lines += [f"## {r['preset']} on {r['cluster']}", ""]
        if "error" in a:
            lines += [f"aware: does not fit: {a['error']}", ""]
        else:
            lines += [
                f"aware (heterogeneous advisor, {a['advisor_s']:.0f} s): {a['layout']}, "
                f"step {a['step_time_s']:.1f} s",
                "",
                "| pipeline rank | device | layers | recompute | memory GiB | limit GiB |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {s['pipeline_rank']} | {s['device']} | {s['layers']} | {s['recompute']} | "
                f"{s['memory_gib']:.1f} | {s['limit_gib']:.0f} |"
                for s in a["stages"]
            ]
            lines.append("")
        for label, x in (("homogeneous (assumes A100-40G)", h), ("homogeneous (assumes H100)", o)):
            if "error" in x:
                lines.append(f"- {label}: no layout fits: {x['error'][:200]}")
            else:
                lines.append(
                    f"- {label}: {x['layout']}, step {x['predicted_on_assumed_s']:.1f} s as "
                    f"assumed, {x['step_time_s']:.1f} s on the real devices, fits them: "
                    f"{x['fits']} (max memory/limit "
                    f"{max(s['memory_gib'] / s['limit_gib'] for s in x['stages']):.2f})"
                )
        if "speedup_vs_homogeneous" in r:
            lines.append(
                f"- aware vs homogeneous (A100-40G assumption): "
                f"{r['speedup_vs_homogeneous']:.2f}x faster predicted"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    results = [run(p, n) for p, n in CASES]
    text = markdown(results)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"results": results},
                                                       indent=2) + "\n")  # fmt: skip
        Path(args.out + ".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
