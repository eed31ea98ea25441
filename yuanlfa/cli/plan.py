"""yuanlfa-plan: per-stage memory and time of a config's pipeline splits, and the balanced one.

Compares three splits under the cost model (yuanlfa.planner.cost): ``released`` (the config's
own block list or layout; the uniform split when it has none), ``uniform`` (as even as whole
layers allow) and ``balanced`` (the exact optimum of --objective, yuanlfa.planner.balance).
The default objective is ``memory`` (the paper's reason for uneven stages): the balanced split
then never has a larger maximum stage memory than the other two; ties are broken by time.
``time`` minimizes the slowest rank among the splits that fit the device (ties broken by the
slowest stage, then by memory) and fails when none fits. Memory is per device (one tensor-
parallel rank of a pipeline rank), time per microbatch; the step time simulates the schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from yuanlfa.cli.common import add_config_args
from yuanlfa.config import Config, ConfigError, load_config, resolve, validate
from yuanlfa.parallel.pipeline.layout import resolve_blocks, uniform_blocks
from yuanlfa.planner.balance import balance
from yuanlfa.planner.cost import CostModel, PlanCost, cost_model
from yuanlfa.planner.devices import DEFAULT_MFU, PRESETS, DevicePreset, get_device

GIB = 2**30
SPLITS = ("released", "uniform", "balanced")


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
        p2p_gbps=model.p2p_gbps,
        tp_gbps=model.tp_gbps,
        dp_gbps=model.dp_gbps,
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
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    edge = 0.3 if pp <= 16 else 0.0  # separators would hide the thin ops of deep pipelines
    for kind, color in colors.items():
        for r in range(pp):
            spans = [
                (op.start_s, op.end_s - op.start_s)
                for op in timeline
                if op.rank == r and op.kind == kind
            ]
            if spans:
                label = {"F": "forward", "B": "backward", "W": "weight grad"}[kind]
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
    parser.add_argument("--objective", choices=("memory", "time"), default="memory")
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
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
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
            "p2p_gbps": args.p2p_gbps,
            "tp_gbps": args.tp_gbps,
            "dp_gbps": args.dp_gbps,
            "memory_limit_bytes": limit,
        }
        model, plans, source = make_plan(
            cfg, device, args.objective, not args.no_empty_stages, **options
        )
        summary = _summary(args, cfg, model, source)
        if args.plot:
            write_plot(args.plot, summary, model, plans)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = dict(summary)
        out.update({name: plan_to_dict(plans[name]) for name in SPLITS})
        print(json.dumps(out, indent=2))
    else:
        _print_text(summary, plans)
        if args.plot:
            print(f"plot written to {args.plot}")
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
        "objective": args.objective,
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
