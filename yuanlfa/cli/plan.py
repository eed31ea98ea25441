"""yuanlfa-plan: per-stage memory and time of a config's pipeline splits, and the balanced one.

Compares three splits under the cost model (yuanlfa.planner.cost): ``released`` (the config's
own block list or layout; the uniform split when it has none), ``uniform`` (as even as whole
layers allow) and ``balanced`` (the exact optimum of --objective, yuanlfa.planner.balance).
The default objective is ``memory`` (the paper's reason for uneven stages): the balanced split
then never has a larger maximum stage memory than the other two; ties are broken by time.
``time`` minimizes the slowest rank among the splits that fit the device (ties broken by the
slowest stage, then by memory) and fails when none fits. Memory is per device (one tensor-
parallel rank of a pipeline rank), time per microbatch; the step time simulates the schedule.

``--advise`` ranks every layout of a cluster (``--nodes`` x ``--gpus-per-node`` devices,
``--intra-bw`` / ``--inter-bw`` GB/s per device with per-message latencies) by predicted step
time: tp x pp x dp, schedule, recompute, distributed optimizer, sequence parallelism and rank
order, each with its balanced split that fits the device (yuanlfa.planner.advisor), and prints
the config snippet of the best. On more than one node it also considers islands joined by
(Streaming) DiLoCo across the inter-node link (yuanlfa.planner.islands), next to the best
layouts with pp and with dp across it: their link bytes and step time per step, and the link
bandwidths at which the islands win. ``--paper-comparison`` prints the Yuan 2.0 paper's weak-link
comparison (tensor parallelism vs pp + dp + ZeRO against bandwidth) under our cost model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from yuanlfa.cli.common import (
    add_cluster_arg,
    add_config_args,
    add_debug_arg,
    run,
    with_cluster_file,
)
from yuanlfa.cli.plan_mixed import mixed_main
from yuanlfa.cli.plugin_costs import load_plugin_costs
from yuanlfa.config import Config, ConfigError, ModelConfig, load_config, resolve, validate
from yuanlfa.layout import resolve_blocks, uniform_blocks
from yuanlfa.planner.advisor import advise
from yuanlfa.planner.balance import balance
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, PRESETS, DevicePreset, get_device
from yuanlfa.planner.islands import MOMENTS, advise_islands
from yuanlfa.planner.links import Link
from yuanlfa.planner.report import (
    advice_to_dict,
    format_advice,
    format_islands,
    format_sweeps,
    islands_to_dict,
)
from yuanlfa.planner.topology import Cluster
from yuanlfa.planner.weak_link import PAPER_BANDWIDTHS_GBPS, paper_comparison

GIB = 2**30
SPLITS = ("released", "uniform", "balanced")


def _check_components(model: ModelConfig) -> None:
    """The filter and attention names and the plug-ins, checked by the model's registry when torch
    is installed. Plug-ins are torch modules, so without torch only plug-in-free configs plan;
    their built-in names are then the planner's to know."""
    try:
        from yuanlfa.model.registry import check_model_config
    except ImportError as exc:
        if model.plugins:
            raise ConfigError(
                f"model.plugins: plug-ins are torch modules and torch is not importable ({exc}); "
                "install torch to plan a config that uses them"
            ) from None
        return
    check_model_config(model)


def _with_pipeline(cfg: Config, pp: int | None, virtual_stages: int | None) -> Config:
    """``cfg`` planned on ``pp`` ranks with ``virtual_stages`` stages each; a split given for
    another shape is dropped (released then means uniform)."""
    p = cfg.parallel
    pp = p.pp if pp is None else pp
    v = p.virtual_stages if virtual_stages is None else virtual_stages
    if pp < 1 or v < 1:
        raise ConfigError(f"--pp and --virtual-stages must be >= 1, got pp={pp}, v={v}")
    if pp * v > cfg.model.num_layers:
        raise ConfigError(
            f"--pp: {pp} ranks x {v} virtual stages = {pp * v} stages for "
            f"model.num_layers={cfg.model.num_layers}; use at most {cfg.model.num_layers} stages"
        )
    if (pp, v) == (p.pp, p.virtual_stages):
        return cfg
    schedule = p.schedule
    if v > 1 and schedule in ("gpipe", "1f1b"):
        schedule = "interleaved_1f1b"
    parallel = dataclasses.replace(
        p,
        pp=pp,
        virtual_stages=v,
        pipeline_blocks="auto",
        pipeline_layout=None,
        schedule=schedule,
    )
    cfg = dataclasses.replace(cfg, parallel=parallel)
    validate(cfg)
    return cfg


def _resolve(cfg: Config) -> Config:
    p = cfg.parallel
    tokenizer_vocab = None
    if cfg.model.vocab_size is None:
        from yuanlfa.data import build_tokenizer

        tokenizer_vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    return resolve(cfg, p.tp * p.pp * p.cp * (p.dp or 1), tokenizer_vocab)


def _released(cfg: Config) -> tuple[tuple[int, ...], str]:
    p = cfg.parallel
    if p.pipeline_blocks == "auto" or (p.pipeline_blocks is None and p.pipeline_layout is None):
        return uniform_blocks(cfg.model.num_layers, p.pp * p.virtual_stages), "uniform"
    return resolve_blocks(p, cfg.model), "config"


def plan_to_dict(plan: PlanCost) -> dict:
    stages = [
        {
            "pipeline_rank": r.rank,
            "stages": list(r.stages),
            "blocks": list(r.blocks),
            "layers": r.layers,
            "memory_bytes": r.memory_bytes,
            "weights_bytes": r.weights_bytes,
            "grads_bytes": r.grads_bytes,
            "optimizer_bytes": r.optimizer_bytes,
            "activation_bytes": r.activation_bytes,
            "workspace_bytes": r.workspace_bytes,
            "in_flight_microbatches": r.in_flight,
            "time_s": r.time_s,
            "forward_s": r.forward_s,
            "backward_s": r.backward_s,
            "comm_s": r.comm_s,
        }
        for r in plan.ranks
    ]
    return {
        "blocks": list(plan.blocks),
        "stages": stages,
        "memory_max_bytes": plan.memory_max_bytes,
        "memory_min_bytes": plan.memory_min_bytes,
        "memory_max_min_ratio": plan.memory_max_min_ratio,
        "time_max_s": plan.time_max_s,
        "step_time_s": plan.step_time_s,
        "pipeline_time_s": plan.pipeline_s,
        "dp_comm_s": plan.dp_comm_s,
        "step_comm_s": plan.step_comm_s,
        "bubble_fraction": plan.bubble_fraction,
        "fits": plan.fits,
    }


def make_plan(
    cfg: Config, device: DevicePreset, objective: str, allow_empty_stages: bool = True, **options
) -> tuple[CostModel, dict[str, PlanCost], str]:
    """The cost model and the three plans of a resolved ``cfg``."""
    model = cost_model(cfg, device, **options)
    released, source = _released(cfg)
    plans = {
        "released": model.evaluate(released),
        "uniform": model.evaluate(uniform_blocks(cfg.model.num_layers, model.num_stages)),
    }
    # The memory objective reports a split over the limit (marked fits: false) rather than
    # nothing; the time objective needs a split that fits.
    result = balance(
        cfg,
        device,
        objective,
        allow_empty_stages=allow_empty_stages,
        require_fit=objective == "time",
        model=model,
    )
    plans["balanced"] = result.cost
    return model, plans, source


def _print_text(summary: dict, plans: dict[str, PlanCost]) -> None:
    s = summary
    print(
        f"{s['config']}: {s['num_layers']} layers, hidden {s['hidden_size']} | pp {s['pp']} x "
        f"v {s['virtual_stages']}, tp {s['tp']}, dp {s['dp']} | {s['num_microbatches']} "
        f"microbatches of {s['micro_batch_size']} x {s['seq_length']} | {s['schedule']}, "
        f"recompute {s['recompute']}"
    )
    print(
        f"device {s['device']['name']} ({s['device']['memory_bytes'] / GIB:.0f} GiB, "
        f"{s['device']['peak_flops'] / 1e12:.0f} TFLOP/s x mfu {s['mfu']}), P2P "
        f"{s['links_gbps']['p2p']:g} GB/s | objective {s['objective']} | released = "
        f"{s['released_source']} split"
    )
    # Units that keep small (CPU-sized) plans readable.
    top = max(plans[n].memory_max_bytes for n in SPLITS)
    mem_unit, mem_div = ("GiB", GIB) if top >= GIB else ("MiB", 2**20)
    slow = max(plans[n].time_max_s for n in SPLITS)
    t_unit, t_div = ("ms", 1e-3) if slow >= 1e-3 else ("us", 1e-6)
    first = 17  # the label column; each split's cell is 28 characters wide
    print(f"{'pipeline rank':<{first}}" + "".join(f" | {name:^25}" for name in SPLITS))
    cell = f" | layers  mem {mem_unit} {t_unit + '/micro':>9}"
    print(" " * first + cell * len(SPLITS))
    for r in range(s["pp"]):
        cells = []
        for name in SPLITS:
            rc = plans[name].ranks[r]
            layers = "+".join(str(b) for b in rc.blocks)
            mem, t = rc.memory_bytes / mem_div, rc.time_s / t_div
            cells.append(f" | {layers:>6} {mem:8.1f} {t:9.1f}")
        print(f"{r:<{first}}" + "".join(cells))
    rows = [
        (f"max memory {mem_unit}", lambda p: f"{p.memory_max_bytes / mem_div:.1f}"),
        ("max/min memory", lambda p: f"{p.memory_max_min_ratio:.2f}"),
        (f"max time {t_unit}/micro", lambda p: f"{p.time_max_s / t_div:.1f}"),
        ("step time s", lambda p: f"{p.step_time_s:.4g}"),
        ("bubble fraction", lambda p: f"{p.bubble_fraction:.4f}"),
        ("fits device", lambda p: "yes" if p.fits else "NO"),
    ]
    for label, fmt in rows:
        print(f"{label:<{first}}" + "".join(f" | {fmt(plans[n]):>25}" for n in SPLITS))
    print("balanced blocks:", ",".join(str(b) for b in plans["balanced"].blocks))


def _timeline_model(model: CostModel) -> CostModel:
    """The model with few enough microbatches for a readable timeline (2 rounds of pp)."""
    m = model.num_microbatches
    shown = 2 * model.pp
    if m <= 2 * shown:
        return model
    cfg = model.cfg
    t = cfg.train
    batch = shown * t.micro_batch_size * (cfg.parallel.dp or 1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch_size=batch))
    return cost_model(
        cfg,
        model.device,
        mfu=model.mfu,
        flops_per_s=model.flops_per_s,
        links=model.links,
        memory_limit_bytes=model.memory_limit_bytes,
        gpu=model.spec.fused_norm,
    )


def write_plot(path: str, summary: dict, model: CostModel, plans: dict[str, PlanCost]) -> None:
    """Per-rank memory of the three splits (with the device limit) over the balanced split's
    schedule timeline (forward / backward / weight-gradient ops per rank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'yuanlfa[plot]'") from None
    from yuanlfa.planner.cost import simulate

    pp = model.pp
    fig, (bars, gantt) = plt.subplots(2, 1, figsize=(max(9.0, 0.45 * pp + 4), 9.5))
    width = 0.8 / len(SPLITS)
    for i, name in enumerate(SPLITS):
        plan = plans[name]
        xs = [r + (i - 1) * width for r in range(pp)]
        label = f"{name} {','.join(map(str, plan.blocks))}" if pp <= 12 else name
        label += f" (max {plan.memory_max_bytes / GIB:.1f} GiB)"
        bars.bar(xs, [r.memory_bytes / GIB for r in plan.ranks], width, label=label)
    if model.memory_limit_bytes is not None:
        bars.axhline(
            model.memory_limit_bytes / GIB,
            color="crimson",
            linestyle="--",
            label=f"{model.device.name} limit {model.memory_limit_bytes / GIB:.0f} GiB",
        )
    bars.set_xticks(range(pp))
    bars.set_xlabel("pipeline rank")
    bars.set_ylabel("memory per device (GiB)")
    bars.set_title(
        f"{summary['config']}: {summary['num_layers']} layers on pp {pp} x v "
        f"{model.virtual_stages}, {summary['schedule']}, recompute {summary['recompute']}"
    )
    bars.legend(fontsize=8, loc="upper right")

    shown = _timeline_model(model)
    timeline = simulate(shown, plans["balanced"].blocks)
    colors = {"F": "tab:blue", "B": "tab:orange", "I": "tab:red", "W": "tab:green"}
    edge = 0.3 if pp <= 16 else 0.0  # separators would hide the thin ops of deep pipelines
    for kind, color in colors.items():
        for r in range(pp):
            spans = [
                (op.start_s, op.end_s - op.start_s)
                for op in timeline
                if op.rank == r and op.kind == kind
            ]
            if spans:
                label = {"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad"}
                label = label[kind]
                gantt.broken_barh(
                    spans, (r - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=edge,
                    label=label if r == 0 else None,
                )  # fmt: skip
    gantt.set_ylim(pp - 0.5, -0.5)
    gantt.set_yticks(range(pp))
    gantt.set_ylabel("pipeline rank")
    gantt.set_xlabel("seconds")
    gantt.set_title(
        f"balanced split, {summary['schedule']} timeline of {shown.num_microbatches} "
        f"microbatches (the step runs {model.num_microbatches}; bubble "
        f"{plans['balanced'].bubble_fraction:.3f} of busy time)"
    )
    gantt.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-plan", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--pp", type=int, default=None, help="pipeline ranks (default: config)")
    parser.add_argument(
        "--virtual-stages", type=int, default=None, help="stages per rank (default: config)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help=f"device preset, one of {', '.join(p.name for p in PRESETS.values())} (default: "
        "H100-SXM, or cpu when train.device is cpu)",
    )
    parser.add_argument(
        "--objective",
        choices=("memory", "time"),
        default=None,
        help="what the balanced split minimizes (default: memory; with a cluster always time "
        "within each device's memory)",
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help="sustained fraction of peak FLOP/s"
    )
    parser.add_argument("--p2p-gbps", type=float, default=None, help="P2P link GB/s")
    parser.add_argument("--tp-gbps", type=float, default=None, help="tensor-parallel link GB/s")
    parser.add_argument("--dp-gbps", type=float, default=None, help="data-parallel link GB/s")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=None, help="per-device limit (default: device)"
    )
    parser.add_argument(
        "--no-empty-stages", action="store_true", help="every stage holds at least one layer"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE", default=None, help="write a PNG of the plans")
    parser.add_argument(
        "--flops",
        type=float,
        default=None,
        help="sustained FLOP/s per device, measured (replaces the device peak x --mfu)",
    )
    add_cluster_arg(parser, "plan or --advise on each rank's own device")
    advise = parser.add_argument_group(
        "layout advisor (--advise): rank every tp x pp x dp layout of a cluster by step time"
    )
    advise.add_argument("--advise", action="store_true", help="rank layouts, print the best")
    advise.add_argument("--nodes", type=int, default=None, help="nodes in the cluster")
    advise.add_argument("--gpus-per-node", type=int, default=None, help="devices per node")
    advise.add_argument("--intra-bw", type=float, default=None, help="intra-node GB/s per device")
    advise.add_argument("--inter-bw", type=float, default=None, help="inter-node GB/s per device")
    advise.add_argument(
        "--intra-latency-us", type=float, default=5.0, help="intra-node latency per message"
    )
    advise.add_argument(
        "--inter-latency-us", type=float, default=10.0, help="inter-node latency per message"
    )
    advise.add_argument("--top", type=int, default=10, help="layouts to list")
    advise.add_argument(
        "--sync-every",
        default="10,50",
        help="islands: outer syncs every H steps, one candidate per H (comma list)",
    )
    advise.add_argument(
        "--islands",
        default=None,
        help="islands to consider (comma list of divisors of --nodes; default: every one >= 2; "
        "0: none)",
    )
    advise.add_argument(
        "--fragments",
        type=int,
        default=None,
        help="islands: Streaming DiLoCo fragments (default min(4, layers); 0: plain DiLoCo only)",
    )
    advise.add_argument(
        "--fragment-delay", type=int, default=1, help="islands: steps a fragment overlaps"
    )
    advise.add_argument(
        "--outer-bytes",
        type=float,
        default=4.0,
        help="islands: bytes per exchanged parameter (4: fp32; less for a quantized exchange)",
    )
    advise.add_argument(
        "--average-moments",
        choices=MOMENTS,
        default="none",
        help="islands: price DiLoCo with outer.average_moments (each moment adds 4 bytes per "
        "exchanged parameter; plain DiLoCo only)",
    )
    advise.add_argument(
        "--islands-gain",
        type=float,
        default=0.1,
        help="islands are advised where at least this much faster than synchronous layouts "
        "(their loss in quality is paid at any speed)",
    )
    advise.add_argument(
        "--paper-comparison",
        action="store_true",
        help="the paper's tp vs pp+dp+ZeRO step times at 400/200/100 GB/s (and Gbit/s)",
    )
    advise.add_argument(
        "--devices", type=int, default=96, help="devices for --paper-comparison (a multiple of 32)"
    )
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-plan", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.cluster is not None or _has_cluster(args):
        return _mixed(args)
    if args.advise or args.paper_comparison:
        return _advise_main(args)
    cfg = load_config(args.config, args.overrides)
    _check_components(cfg.model)
    load_plugin_costs(cfg.model)
    cfg = _resolve(_with_pipeline(cfg, args.pp, args.virtual_stages))
    name = args.device or ("cpu" if cfg.train.device == "cpu" else "H100-SXM")
    device = get_device(name)
    limit = None
    if args.memory_limit_gib is not None:
        if args.memory_limit_gib <= 0:
            raise ConfigError(f"--memory-limit-gib must be > 0, got {args.memory_limit_gib}")
        limit = int(args.memory_limit_gib * GIB)
    options = {
        "mfu": args.mfu,
        "flops_per_s": args.flops,
        "p2p_gbps": args.p2p_gbps,
        "tp_gbps": args.tp_gbps,
        "dp_gbps": args.dp_gbps,
        "memory_limit_bytes": limit,
    }
    model, plans, source = make_plan(
        cfg, device, args.objective or "memory", not args.no_empty_stages, **options
    )
    summary = _summary(args, cfg, model, source)
    if args.plot:
        write_plot(args.plot, summary, model, plans)
    if args.json:
        out = dict(summary)
        out.update({name: plan_to_dict(plans[name]) for name in SPLITS})
        print(json.dumps(out, indent=2))
    else:
        _print_text(summary, plans)
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _mixed_unused_flags(args: argparse.Namespace) -> list[tuple[str, object]]:
    """Flags of the one-device plan a cluster plan has no use for (silently ignoring them would
    show a plan the user did not ask for)."""
    return [
        ("--objective", args.objective),
        ("--flops", args.flops),
        ("--p2p-gbps", args.p2p_gbps),
        ("--tp-gbps", args.tp_gbps),
        ("--dp-gbps", args.dp_gbps),
        ("--no-empty-stages", args.no_empty_stages),
        ("--memory-limit-gib without --advise", args.memory_limit_gib and not args.advise),
        ("--plot with --advise", args.plot and args.advise),
    ]


def _has_cluster(args: argparse.Namespace) -> bool:
    """Whether the config describes a cluster (errors are reported by the main path)."""
    try:
        return bool(load_config(args.config, args.overrides).cluster.groups)
    except (ConfigError, OSError):
        return False


def _mixed(args: argparse.Namespace) -> int:
    """A heterogeneous cluster: yuanlfa.cli.plan_mixed."""
    cfg = load_config(args.config, args.overrides)
    _check_components(cfg.model)
    load_plugin_costs(cfg.model)
    if args.paper_comparison or args.nodes is not None or args.device is not None:
        raise ConfigError(
            "--cluster: the cluster file (or the config's cluster section) gives the devices "
            "and nodes; drop --device / --nodes / --paper-comparison"
        )
    unused = [flag for flag, value in _mixed_unused_flags(args) if value]
    if unused:
        raise ConfigError(
            f"--cluster: {' / '.join(unused)} do not apply to a cluster (its groups give each "
            "device's speed, memory and links; the split minimizes time within each device's "
            "memory); drop them"
        )
    cfg = with_cluster_file(cfg, args.cluster)
    validate(cfg)  # the cluster against parallel.dp, before any planning
    cfg = _with_pipeline(cfg, args.pp, args.virtual_stages)
    return mixed_main(args, cfg, _tokenizer_vocab(cfg))


def _cluster(args: argparse.Namespace) -> Cluster:
    """The cluster of the --advise flags; ConfigError naming a missing or impossible one."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value is None:
            raise ConfigError(f"{flag}: --advise needs --nodes, --gpus-per-node and --intra-bw")
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if args.intra_bw is None:
        raise ConfigError("--intra-bw: --advise needs the intra-node bandwidth in GB/s")
    inter = args.inter_bw
    if inter is None:
        if args.nodes > 1:
            raise ConfigError("--inter-bw: needed with --nodes > 1 (GB/s per device)")
        inter = args.intra_bw
    for flag, value in (("--intra-bw", args.intra_bw), ("--inter-bw", inter)):
        if not value > 0:
            raise ConfigError(f"{flag}: bandwidth must be > 0 GB/s, got {value}")
    for flag, value in (
        ("--intra-latency-us", args.intra_latency_us),
        ("--inter-latency-us", args.inter_latency_us),
    ):
        if not value >= 0:
            raise ConfigError(f"{flag}: must be >= 0, got {value}")
    return Cluster(
        args.nodes,
        args.gpus_per_node,
        Link(args.intra_bw, args.intra_latency_us * 1e-6),
        Link(inter, args.inter_latency_us * 1e-6),
    )


def _tokenizer_vocab(cfg: Config) -> int | None:
    if cfg.model.vocab_size is not None:
        return None
    from yuanlfa.data import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer).vocab_size


def _advise_main(args: argparse.Namespace) -> int:
    """--advise and --paper-comparison."""
    cfg = load_config(args.config, args.overrides)
    _check_components(cfg.model)
    load_plugin_costs(cfg.model)
    device = get_device(args.device or ("cpu" if cfg.train.device == "cpu" else "H100-SXM"))
    if args.paper_comparison:
        return _paper_main(args, cfg, device)
    limit = None
    if args.memory_limit_gib is not None:
        if args.memory_limit_gib <= 0:
            raise ConfigError(f"--memory-limit-gib must be > 0, got {args.memory_limit_gib}")
        limit = int(args.memory_limit_gib * GIB)
    sync_every = _int_list("--sync-every", args.sync_every, 1)
    islands = None if args.islands is None else _int_list("--islands", args.islands, 0)
    islands = [n for n in islands if n] if islands is not None else None
    fragments = args.fragments
    if fragments is None:
        fragments = min(4, cfg.model.num_layers)
    if fragments < 0 or args.fragment_delay < 0:
        raise ConfigError("--fragments and --fragment-delay: must be >= 0")
    vocab = _tokenizer_vocab(cfg)
    cluster = _cluster(args)
    # The islands compare with the best layouts with pp and with dp across the link: look
    # further down the ranking than --top shows.
    advice = advise(
        cfg,
        cluster,
        device,
        top=max(args.top, 10),
        mfu=args.mfu,
        flops_per_s=args.flops,
        memory_limit_bytes=limit,
        tokenizer_vocab=vocab,
    )
    island_advice = None
    if cluster.nodes > 1 and islands != []:
        island_advice = advise_islands(
            cfg, advice, device, sync_every=sync_every, islands=islands, fragments=fragments,
            fragment_delay=args.fragment_delay, dtype_bytes=args.outer_bytes,
            moments=MOMENTS.index(args.average_moments), gain=args.islands_gain, mfu=args.mfu,
            flops_per_s=args.flops,
            memory_limit_bytes=limit, tokenizer_vocab=vocab,
        )  # fmt: skip
    advice = dataclasses.replace(advice, ranked=advice.ranked[: args.top])
    if args.json:
        out = advice_to_dict(advice)
        if island_advice is not None:
            out["islands"] = islands_to_dict(island_advice, cluster)
        print(json.dumps(out, indent=2))
    else:
        islands_text = None
        if island_advice is not None:
            islands_text = format_islands(island_advice, cluster)
        print(format_advice(advice, device.name, islands_text))
    return 0


def _int_list(flag: str, text: str, least: int) -> list[int]:
    """A comma list of integers >= ``least``; ConfigError naming the flag otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag}: {text!r} must be a comma list of integers, e.g. 10,50"
        ) from None
    if not values or min(values) < least:
        raise ConfigError(f"{flag}: {text!r} needs integers >= {least}")
    return values


def _paper_main(args: argparse.Namespace, cfg: Config, device: DevicePreset) -> int:
    world = args.devices
    if world < 32 or world % 32:
        raise ConfigError(f"--devices: the paper's layouts need a multiple of 32, got {world}")
    as_gb = paper_comparison(cfg, device, world, PAPER_BANDWIDTHS_GBPS, mfu=args.mfu)
    # The same figures read as Gbit/s (a factor 8 fewer bytes per second).
    as_gbit = paper_comparison(
        cfg, device, world, [b / 8 for b in PAPER_BANDWIDTHS_GBPS], mfu=args.mfu
    )
    if args.json:
        out = {
            reading: {
                r.name: {"bandwidths_gbps": list(r.bandwidths_gbps), "step_s": list(r.step_times_s)}
                for r in results
            }
            for reading, results in (("GB/s", as_gb), ("Gbit/s", as_gbit))
        }
        print(json.dumps({"devices": world, "device": device.name, **out}, indent=2))
        return 0
    print(f"{args.config} on {world} x {device.name} (mfu {args.mfu}), every link at the bandwidth")
    print(format_sweeps(as_gb, world, [f"{b:g} GB/s" for b in PAPER_BANDWIDTHS_GBPS]))
    print()
    print(format_sweeps(as_gbit, world, [f"{b:g} Gb/s" for b in PAPER_BANDWIDTHS_GBPS]))
    return 0


def _summary(args: argparse.Namespace, cfg: Config, model: CostModel, source: str) -> dict:
    p, t, d = cfg.parallel, cfg.train, model.device
    return {
        "config": args.config,
        "device": {
            "name": d.name,
            "peak_flops": d.peak_flops,
            "memory_bytes": d.memory_bytes,
            "link_gbps": d.link_gbps,
        },
        "memory_limit_bytes": model.memory_limit_bytes,
        "objective": args.objective or "memory",
        "mfu": model.mfu,
        "links_gbps": {"p2p": model.p2p_gbps, "tp": model.tp_gbps, "dp": model.dp_gbps},
        "num_layers": cfg.model.num_layers,
        "hidden_size": cfg.model.hidden_size,
        "pp": p.pp,
        "virtual_stages": p.virtual_stages,
        "tp": p.tp,
        "dp": p.dp,
        "sequence_parallel": p.sequence_parallel,
        "schedule": p.schedule,
        "distributed_optimizer": cfg.optim.distributed,
        "recompute": t.recompute,
        "micro_batch_size": t.micro_batch_size,
        "seq_length": t.seq_length,
        "num_microbatches": model.num_microbatches,
        "activation_dtype_bytes": model.spec.dtype_bytes,
        "released_source": source,
    }


if __name__ == "__main__":
    raise SystemExit(main())
