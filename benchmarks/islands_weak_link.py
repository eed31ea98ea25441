"""Islands + DiLoCo over a weak link, measured: bytes over the link per step and step time, next
to pipeline and data parallelism across the same link, with the advisor's predictions.

Two network namespaces joined by shaped veth links (tools/emulated_cluster.py, as
benchmarks/weak_link.py) act as two nodes, one gloo process each, training weak_link.py's model
(8 layers, hidden 256, sequence 128, micro batch 2, global batch 8) six ways:

  islands-H10 / islands-H50      parallel.islands=2 (one rank per island), outer.algorithm=diloco,
                                 outer.sync_every=H: the global batch is split over the islands;
  streaming-H10 / streaming-H50  the same with outer.algorithm=streaming_diloco, 5 fragments
                                 (the 8 layers in runs of 2, 2, 1, 2, 1; H must be a multiple of
                                 the fragments), each fragment's exchange overlapped with the
                                 next inner step (outer.fragment_delay=1: below H / 5, so no two
                                 fragments are in flight at once and a window can start where
                                 none is: its wire bytes count whole exchanges);
  overlap-H10 / overlap-H50      DiLoCo with its exchange hidden behind compute: streaming_diloco
                                 with 2 fragments (half the model each), each exchange overlapped
                                 with 4 inner steps and merged with outer.fragment_merge=carry
                                 (the local steps meanwhile are kept: the quality is DiLoCo's,
                                 benchmarks/islands_quality.py measures it);
  overlapbf16-H10 / -H50         the same with bf16 pseudo-gradients (outer.quantize=true: half
                                 the bytes, so the exchange fits the 4 steps at 100 Mbit/s);
  pp                             parallel.pp=2 across the link (the balancer's split, 1F1B);
  dp                             dp=2 across the link with the distributed optimizer (ZeRO-1).

Per case one launch sweeps the link rates (default 10000, 1000, 100 Mbit/s; the fastest is the
"unthrottled" reference) with ``tc qdisc change`` as weak_link.py does. Per rate, a window of
steps (for islands a multiple of H, so it holds exactly as many outer syncs whatever its phase)
gives: the step time (wall time over the window / steps: it includes the outer syncs, whatever
the trainer's ``step_time_s`` counts), the bytes node 0 sent through its veth per step (wire
bytes, headers and ACKs included; ``payload`` is that times the TCP payload share), and for
islands the trainer's own ``link_bytes``.

Predictions come from the planner (yuanlfa.planner.islands: the same ring formula and cost model
as ``yuanlfa-plan --advise``) with three constants, each stated in the result:

- the link's per-message latency, measured, not fitted: before the cases, at each rate, a gloo
  ping-pong of a 4-byte tensor between the two nodes (benchmarks/_emulated.py ``probe_link``),
  half the round trip; the median over the rates is used (the probe also times a 4 MB
  all-reduce, recorded next to the link model's figure for it);
- the sustained FLOP/s, fitted on islands-H50 at the fastest rate (compute-bound);
- the collective library's host-side throughput (``Link.cpu_gbps``: every byte a collective or
  P2P message sends also costs bytes / cpu_gbps of CPU time: copies, sums and the distributed
  optimizer's gloo path on the two cores that run the model), fitted on dp at the fastest rate,
  where the link itself costs little but dp's 57 MB of gradient and parameter traffic take the
  cores for most of a second.

The latency and FLOP/s fits see the third through the joint iteration. Every other point is a
prediction, checked against 15%. Goals (issue 20): DiLoCo's link bytes per step at most 1/H of
dp's; its step time within 10% of the same run on the fastest link.

The dp bytes count gloo's reduce-scatter as the all-reduce it is (yuanlfa.planner.comm
``reduce_scatter_bytes``): ZeRO-1 on gloo sends the whole gradient buffer, then the all-gather
of the parameters, 1.5 times a ring reduce-scatter's bytes.

    python benchmarks/islands_weak_link.py --out benchmarks/results/islands_weak_link_cpu

Needs root (network namespaces; without them it says so and exits 0) and the islands in the
config schema (``parallel.islands``, ``outer:``; without them it says so and exits 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _emulated import busy_cores, cluster, probe_link, source_commit, wait_for_quiet
from _env import cpu_name  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.emulated_cluster import EmulatedCluster, namespaces_supported  # noqa: E402
from yuanlfa.config import Config, load_config, resolve  # noqa: E402
from yuanlfa.planner import balance, cost_model, get_device  # noqa: E402
from yuanlfa.planner.calibrate import (  # noqa: E402
    TCP_PAYLOAD_EFFICIENCY,
    fit_cpu_gbps,
    fit_flops_per_s,
)
from yuanlfa.planner.islands import (  # noqa: E402
    Outer,
    as_ranked,
    island_cluster,
    islands_candidate,
    sync_link_bytes,
)
from yuanlfa.planner.links import ring_all_reduce_s  # noqa: E402

TARGET = 0.15  # predictions within 15% of the measurements
STEP_TARGET = 0.10  # islands' step time within 10% of the fastest link's
CONFIG = "configs/tiny.yaml"
MODEL = [
    "model.num_layers=8",
    "model.hidden_size=256",
    "model.num_heads=4",
    "train.seq_length=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.device=cpu",
    "train.eval_interval=0",
    "train.eval_iters=0",
    "checkpoint.save_at_end=false",
]
CASES = (
    "islands-H10",
    "islands-H50",
    "streaming-H10",
    "streaming-H50",
    "overlap-H10",
    "overlap-H50",
    "overlapbf16-H10",
    "overlapbf16-H50",
    "pp",
    "dp",
)
ISLANDS = 2
# (fragments, fragment_delay) per streaming case family. The fragments divide H = 10 and 50; the
# delay stays below H / fragments so that a measuring window can start where no exchange is in
# flight (see ``aligned``). streaming: 5 fragments (the 8 layers in runs of 2, 2, 1, 2, 1), one
# step of overlap; overlap: 2 fragments, 4 steps, enough to hide half the model's exchange at
# 100 Mbit/s behind this model's ~0.5 s steps.
STREAMING = {"streaming": (5, 1), "overlap": (2, 4), "overlapbf16": (2, 4)}
# Families sending their pseudo-gradients as bf16 (outer.quantize).
QUANTIZED = ("overlapbf16",)


def islands_in_schema() -> str | None:
    """None when the config knows parallel.islands and the outer section, else what is missing."""
    from yuanlfa.config import schema

    fields = {f.name for f in dataclasses.fields(schema.ParallelConfig)}
    if "islands" not in fields:
        return "parallel.islands"
    if "outer" not in {f.name for f in dataclasses.fields(schema.Config)}:
        return "the outer: section"
    return None


def sync_every(case: str) -> int | None:
    return int(case.split("-H")[1]) if "-H" in case else None


def outer_of(case: str) -> Outer:
    H = sync_every(case)
    assert H is not None
    family = case.split("-H")[0]
    if family in STREAMING:
        width = 2.0 if family in QUANTIZED else 4.0
        return Outer("streaming_diloco", H, *STREAMING[family], dtype_bytes=width)
    return Outer("diloco", H)


def case_overrides(case: str, blocks: tuple[int, ...]) -> list[str]:
    H = sync_every(case)
    if H is not None:
        outer = outer_of(case)
        out = [
            f"parallel.islands={ISLANDS}",
            f"outer.algorithm={outer.algorithm}",
            f"outer.sync_every={H}",
        ]
        if outer.algorithm == "streaming_diloco":
            out += [f"outer.fragments={outer.fragments}",
                    f"outer.fragment_delay={outer.fragment_delay}"]  # fmt: skip
        if case.startswith("overlap"):
            out.append("outer.fragment_merge=carry")
        if case.split("-H")[0] in QUANTIZED:
            out.append("outer.quantize=true")
        return out
    if case == "pp":
        return ["parallel.pp=2", f"parallel.pipeline_blocks=[{','.join(map(str, blocks))}]"]
    return ["optim.distributed=true"]  # dp = 2 from the world size


def planner_config(case: str, data_path: str, blocks: tuple[int, ...]) -> Config:
    """The config the planner costs: for islands one island's (one rank, half the batch)."""
    from yuanlfa.data import build_tokenizer

    overrides = [*MODEL, f"data.path={data_path}"]
    if sync_every(case) is None:
        overrides += case_overrides(case, blocks)
        world = 2
    else:
        overrides += [f"train.global_batch_size={8 // ISLANDS}"]
        world = 1
    cfg = load_config(ROOT / CONFIG, overrides)
    return resolve(cfg, world, build_tokenizer(cfg.data.tokenizer).vocab_size)


def predict(
    case: str,
    cfg: Config,
    blocks: tuple[int, ...],
    rate: float,
    flops: float,
    latency: float,
    cpu_gbps: float | None,
) -> tuple[float, float]:
    """(step seconds, link bytes per step sent by one node / island) at ``rate`` Mbit/s."""
    device = get_device("cpu")
    options = {"flops_per_s": flops, "mfu": 0.5, "memory_limit_bytes": None}
    net = cluster(rate, latency, cpu_gbps)
    H = sync_every(case)
    if H is None:
        split = blocks if cfg.parallel.pp > 1 else (cfg.model.num_layers,)
        r = as_ranked(cfg, split, net, device, options)
        model = cost_model(cfg, device, cluster=net, flops_per_s=flops)
        return r.step_time_s, sync_link_bytes(model, r.plan, net) or 0.0
    inner = as_ranked(cfg, (cfg.model.num_layers,), island_cluster(net, ISLANDS), device, options)
    c = islands_candidate(inner, ISLANDS, outer_of(case), net, device, options)
    return c.step_time_s, c.link_bytes_per_step


def balanced_split(data_path: str) -> tuple[int, ...]:
    cfg = planner_config("pp", data_path, (4, 4))
    cfg = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, pipeline_blocks="auto")
    )
    model = cost_model(cfg, get_device("cpu"), cluster=cluster(1000.0, 0.0))
    return balance(cfg, get_device("cpu"), "time", model=model).blocks


def spacing(case: str) -> int:
    """Steps between two fragments' exchanges (streaming), else 1."""
    H = sync_every(case)
    if H is None or outer_of(case).algorithm != "streaming_diloco":
        return 1
    return H // outer_of(case).fragments


def aligned(case: str, step: int) -> int:
    """The first step >= ``step`` at which no exchange is in flight once its record is written:
    a streaming fragment's exchange starts after a step that is a multiple of ``spacing`` and
    is applied ``fragment_delay`` steps later, so a window starting there counts whole
    exchanges (plain DiLoCo's blocks within its step: every step is aligned)."""
    k = spacing(case)
    return step + (outer_of(case).fragment_delay - step) % k if k > 1 else step


def window(case: str, args: argparse.Namespace) -> int:
    H = sync_every(case)
    return args.steps if H is None else H * args.syncs


def measure(args, data_path: str, blocks: tuple[int, ...], logs: Path) -> dict:
    """({(case, rate): [{"step_s", "wire_bytes", "link_bytes", ...} per launch]}, the link
    probes: [{"rate_mbit", "one_way_s", ...} per rate])."""
    runs: dict[tuple[str, float], list[dict]] = {}
    probes = []
    with EmulatedCluster(2, args.rates[0]) as net:
        busy = wait_for_quiet(args.quiet_wait)
        for rate in args.rates:
            net.set_rate(rate)
            probe = {"rate_mbit": rate, **probe_link(net, nice=args.nice)}
            probe["busy_cores_before"] = busy
            probes.append(probe)
            print(
                f"  probe at {rate:>7g} Mbit/s: {probe['one_way_s'] * 1e3:.3f} ms one way, "
                f"{probe['large_bytes'] / 2**20:.0f} MB all-reduce "
                f"{probe['large_all_reduce_s'] * 1e3:.1f} ms",
                flush=True,
            )
        for repeat in range(args.repeats):
            order = args.rates if repeat % 2 == 0 else args.rates[::-1]
            for case in args.cases:
                per_rate = args.settle + window(case, args) + spacing(case) - 1
                total = args.warmup + len(order) * per_rate
                overrides = [*MODEL, f"data.path={data_path}", f"train.steps={total}"]
                overrides += case_overrides(case, blocks)
                net.set_rate(order[0])
                busy = wait_for_quiet(args.quiet_wait)
                launch = net.launch(
                    ROOT / CONFIG, overrides, logs / f"{case}-{repeat}", nice=args.nice
                )
                try:
                    for i, rate in enumerate(order):
                        if i > 0:
                            net.set_rate(rate)
                        first = aligned(case, args.warmup + i * per_rate + args.settle)
                        steps = window(case, args)
                        launch.wait_for_records(first, timeout_s=1800)
                        t0, b0 = time.perf_counter(), net.tx_bytes(0)
                        records = launch.wait_for_records(first + steps, timeout_s=1800)
                        t1, b1 = time.perf_counter(), net.tx_bytes(0)
                        mine = records[first : first + steps]
                        link = [r["link_bytes"] for r in mine if "link_bytes" in r]
                        point = {
                            "step_s": (t1 - t0) / steps,
                            "trainer_step_s": statistics.mean(r["step_time_s"] for r in mine),
                            "wire_bytes": (b1 - b0) / steps,
                            "link_bytes": sum(link) / steps if link else None,
                            "outer_syncs": sum(bool(r.get("outer_sync")) for r in mine),
                            "busy_cores_before": busy,
                        }
                        runs.setdefault((case, rate), []).append(point)
                        print(
                            f"  [{repeat + 1}/{args.repeats}] {case} at {rate:>7g} Mbit/s: "
                            f"{point['step_s']:.3f} s/step, "
                            f"{point['wire_bytes'] / 1e6:.3f} MB/step on the wire, "
                            f"steps {first + 1}-{first + steps}",
                            flush=True,
                        )
                    launch.wait(1800)
                finally:
                    launch.stop()
    return runs, probes


def write_plot(path: str, points: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: the plot is left out (pip install -e '.[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    colors = ("tab:green", "tab:olive", "tab:purple", "tab:pink", "tab:cyan", "tab:gray",
              "tab:brown", "tab:orange", "tab:blue", "tab:red")  # fmt: skip
    for case, color in zip(CASES, colors):
        mine = sorted((p for p in points if p["case"] == case), key=lambda p: p["rate_mbit"])
        if not mine:
            continue
        xs = [p["rate_mbit"] for p in mine]
        left.plot(xs, [p["measured_s"] for p in mine], "o-", color=color, label=f"{case} measured")
        left.plot(xs, [p["predicted_s"] for p in mine], "x--", color=color, label="predicted")
        right.plot(xs, [p["payload_bytes"] / 1e6 for p in mine], "o-", color=color, label=case)
        right.plot(xs, [p["predicted_bytes"] / 1e6 for p in mine], "x--", color=color)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth between the two nodes (Mbit/s, tc tbf)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("step time (s)")
    left.set_ylim(bottom=0)
    right.set_yscale("log")
    right.set_ylabel("MB per step sent by one node (payload; x: predicted)")
    fig.suptitle("Islands + DiLoCo vs pp and dp across a weak link (2 emulated nodes, gloo, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10000,1000,100", help="Mbit/s, fastest first")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=6, help="pp/dp: steps measured per rate")
    parser.add_argument("--syncs", type=int, default=1, help="islands: H x this steps per rate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=int, default=1, help="steps left out after a change")
    parser.add_argument("--repeats", type=int, default=1, help="launches per case (median kept)")
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--nice", type=int, default=-10)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--keep-logs", default=None)
    args = parser.parse_args()
    try:
        args.rates = sorted((float(r) for r in args.rates.split(",")), reverse=True)
    except ValueError:
        parser.error(f"--rates: {args.rates!r} must be a comma list of Mbit/s")
    args.cases = args.cases.split(",")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    if min(args.steps, args.syncs, args.repeats) < 1 or min(args.warmup, args.settle) < 0:
        parser.error("--steps, --syncs and --repeats must be >= 1, --warmup and --settle >= 0")
    missing = islands_in_schema()
    if missing is not None and any(c.startswith("islands") for c in args.cases):
        print(
            f"error: the config schema has no {missing} yet (issue 20's training side); merge "
            "it first, or run only --cases pp,dp",
            file=sys.stderr,
        )
        return 2
    ok, reason = namespaces_supported()
    if not ok:
        print(f"skipped: {reason}")
        return 0
    from yuanlfa.data import ensure_default_corpus

    data_path = ensure_default_corpus("byte")
    blocks = balanced_split(data_path)
    print(f"pp's balanced split: {list(blocks)}", flush=True)
    logs_tmp = tempfile.mkdtemp(prefix="islands_weak_link_")
    try:
        runs, probes = measure(args, data_path, blocks, Path(args.keep_logs or logs_tmp))
    finally:
        shutil.rmtree(logs_tmp, ignore_errors=True)
    measured = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    wire = {k: statistics.median(r["wire_bytes"] for r in v) for k, v in runs.items()}
    cfgs = {c: planner_config(c, data_path, blocks) for c in args.cases}
    fast = args.rates[0]

    def at(case: str, rate: float, f: float, c: float | None) -> float:
        return predict(case, cfgs[case], blocks, rate, f, latency, c)[0]

    # The latency: measured (the probe's one-way time, median over the rates).
    latency = statistics.median(p["one_way_s"] for p in probes)
    flops, cpu_gbps = 1e10, None
    flops_case = "islands-H50" if "islands-H50" in args.cases else args.cases[0]
    cpu_case = "dp" if "dp" in args.cases else None
    for _ in range(8):  # each fit uses the other's current value
        flops = fit_flops_per_s(
            lambda f, c=cpu_gbps: at(flops_case, fast, f, c), measured[flops_case, fast]
        )
        if cpu_case is None:
            break
        cpu_gbps = fit_cpu_gbps(
            lambda c, f=flops: at(cpu_case, fast, f, c), measured[cpu_case, fast]
        )
    for probe in probes:  # the link model's figure for the probe's large all-reduce
        link = cluster(probe["rate_mbit"], latency, cpu_gbps).inter
        probe["model_large_all_reduce_s"] = ring_all_reduce_s(probe["large_bytes"], 2, link)
    points = []
    for (case, rate), reps in sorted(
        runs.items(), key=lambda kv: (CASES.index(kv[0][0]), -kv[0][1])
    ):
        step, nbytes = predict(case, cfgs[case], blocks, rate, flops, latency, cpu_gbps)
        calibration = rate == fast and case in (flops_case, cpu_case)
        payload = wire[case, rate] * TCP_PAYLOAD_EFFICIENCY
        link = [r["link_bytes"] for r in reps if r["link_bytes"] is not None]
        points.append(
            {
                "case": case,
                "rate_mbit": rate,
                "measured_s": round(measured[case, rate], 4),
                "predicted_s": round(step, 4),
                "step_error": round(step / measured[case, rate] - 1, 4),
                "wire_bytes": round(wire[case, rate]),
                "payload_bytes": round(payload),
                "trainer_link_bytes": round(statistics.median(link)) if link else None,
                "predicted_bytes": round(nbytes),
                "bytes_error": round(nbytes / payload - 1, 4) if payload else None,
                "role": "calibration" if calibration else "prediction",
                "launches": reps,
            }
        )
    print()
    print(
        f"{'case':<14} {'Mbit/s':>7} {'step s':>8} {'pred s':>8} {'err':>7} "
        f"{'MB/step':>9} {'pred MB':>9} {'err':>7} {'trainer MB':>10}  role"
    )
    for p in points:
        trainer = p["trainer_link_bytes"]
        print(
            f"{p['case']:<14} {p['rate_mbit']:>7g} {p['measured_s']:>8.3f} "
            f"{p['predicted_s']:>8.3f} {p['step_error']:>+7.1%} {p['payload_bytes'] / 1e6:>9.3f} "
            f"{p['predicted_bytes'] / 1e6:>9.3f} {p['bytes_error'] or 0:>+7.1%} "
            f"{'-' if trainer is None else f'{trainer / 1e6:.3f}':>10}  {p['role']}"
        )
    goals = []
    preds = [p for p in points if p["role"] == "prediction"]
    worst = max((abs(p["step_error"]) for p in preds), default=0.0)
    worst_bytes = max((abs(p["bytes_error"] or 0) for p in points), default=0.0)
    goals.append(("predicted step times within 15%", worst <= TARGET, f"worst {worst:.1%}"))
    goals.append(
        ("predicted link bytes within 15%", worst_bytes <= TARGET, f"worst {worst_bytes:.1%}")
    )
    by = {(p["case"], p["rate_mbit"]): p for p in points}
    for case in args.cases:
        H = sync_every(case)
        if H is None:
            continue
        for rate in args.rates:
            dp = by.get(("dp", rate))
            if dp is not None:
                ratio = by[case, rate]["payload_bytes"] / dp["payload_bytes"]
                goals.append((f"{case} bytes <= dp's / {H} at {rate:g}", ratio <= 1 / H,
                              f"{ratio:.4f} of dp's"))  # fmt: skip
            if rate != fast:
                slow = by[case, rate]["measured_s"] / by[case, fast]["measured_s"] - 1
                goals.append((f"{case} step at {rate:g} within 10% of {fast:g}",
                              slow <= STEP_TARGET, f"{slow:+.1%}"))  # fmt: skip
    cpu = "free" if cpu_gbps is None else f"{cpu_gbps * 1e3:.1f} MB/s"
    print(f"calibration at {fast:g} Mbit/s: {flops / 1e9:.1f} GFLOP/s ({flops_case}), "
          f"collectives' host-side throughput {cpu} ({cpu_case}); latency "
          f"{latency * 1e3:.3f} ms per message (measured: gloo ping-pong)")  # fmt: skip
    for name, met, detail in goals:
        print(f"{'met' if met else 'NOT met':>7}: {name} ({detail})")
    if args.out:
        import torch

        result = {
            "benchmark": "islands_weak_link",
            "date": datetime.date.today().isoformat(),
            "device": cpu_name(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "source": source_commit(),
            "config": CONFIG,
            "overrides": MODEL,
            "cases": {c: case_overrides(c, blocks) for c in args.cases},
            "calibration": {
                "flops_per_s": flops,
                "flops_from": f"fitted on {flops_case} at {fast:g}",
                "cpu_gbps": cpu_gbps,
                "cpu_gbps_from": f"fitted on {cpu_case} at {fast:g}",
                "latency_s": latency,
                "latency_from": "measured: median over the rates of half a gloo ping-pong of "
                "a 4-byte tensor across the link",
                "link_payload_efficiency": TCP_PAYLOAD_EFFICIENCY,
                "probes": probes,
                "load_average": os.getloadavg(),
                "busy_cores_at_end": busy_cores(),
            },  # fmt: skip
            "fragments_and_delay": STREAMING,
            "goals": [{"goal": n, "met": m, "detail": d} for n, m, d in goals],
            "points": points,
        }
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_plot(f"{args.out}.png", points)
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
