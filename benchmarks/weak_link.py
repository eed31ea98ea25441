"""Weak links, measured: step time against link bandwidth on an emulated two-node cluster.

Two network namespaces joined through a bridge by veth links shaped with ``tc tbf``
(tools/emulated_cluster.py) act as two nodes, one gloo process each (2 cores here), and train
the same model (8 layers, hidden 256, 4 heads, sequence 128, micro batch 2, global batch 8: 4
microbatches, fp32) with the two layouts of the paper's comparison (docs/yuan2_facts.md):

  A  tensor parallelism across the link: tp=2 (every layer all-reduces its activations);
  B  pipeline parallelism across the link: pp=2 with the balancer's split, 1F1B (one
     activation per microbatch crosses, and its gradient back).

The link rate is swept (default 10000, 3000, 1000, 300, 100 Mbit/s) inside one launch per case:
the qdiscs are changed in place as soon as a rate's last step is logged, the step under way
during the change is left out, and a rate's figure is the median of the trainer's
``step_time_s`` over its next steps. This 2-core machine is shared, so each launch first
waits for the machine's other work to stop (``--quiet-wait``) and runs at a favoured priority
(``--nice``, root); the sweep is repeated (``--repeats`` launches per case, alternating its
direction) and each point is the median of its launches' medians. netem (link delay) is not in
this machine's kernel, so no delay is added: the links' latency is the stack's own.

The cost model (yuanlfa.planner) predicts every point from two constants fitted on one measured
point each: the sustained FLOP/s on B's fastest point (compute dominates it) and the per-message
latency on A's fastest point (at 10 Gbit/s the 168 all-reduces of 256 KB in A's step are
latency-bound). Bandwidth enters as the shaped rate times the TCP payload share of a frame
(1448 / 1514, not fitted). All other points, A's and B's, are predictions; each one's error
(predicted / measured - 1) is checked against 15%. The two constants are fitted jointly (each
fit uses the other's current value; a few rounds converge).

    python benchmarks/weak_link.py                       # prints the table
    python benchmarks/weak_link.py --out benchmarks/results/weak_link_cpu   # + .json, .png

Needs root (network namespaces); without them it says so and exits 0. Leaves nothing behind:
the namespaces, veths and qdiscs are deleted on exit, the run logs live in a temporary
directory (``--keep-logs DIR`` keeps them).
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
from pathlib import Path

from _emulated import cluster, source_commit, wait_for_quiet
from _env import cpu_name  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.emulated_cluster import (  # noqa: E402
    EmulatedCluster,
    namespaces_supported,
    netem_supported,
)
from yuanlfa.config import Config, load_config, resolve  # noqa: E402
from yuanlfa.planner import balance, cost_model, get_device  # noqa: E402
from yuanlfa.planner.calibrate import (  # noqa: E402
    TCP_PAYLOAD_EFFICIENCY,
    fit_flops_per_s,
    fit_latency_s,
)

TARGET = 0.15  # issue #9: predictions within 15% of the measurements
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
CASES = {
    "A": "tp=2 across the link",
    "B": "pp=2 across the link (balanced split, 1F1B)",
}


def case_overrides(case: str, blocks: tuple[int, ...] | None) -> list[str]:
    if case == "A":
        return ["parallel.tp=2"]
    return ["parallel.pp=2", f"parallel.pipeline_blocks=[{','.join(map(str, blocks or ()))}]"]


def case_config(case: str, data_path: str, steps: int, blocks: tuple[int, ...] | None) -> Config:
    from yuanlfa.data import build_tokenizer

    overrides = [*MODEL, f"data.path={data_path}", f"train.steps={steps}"]
    overrides += case_overrides(case, blocks or (4, 4))
    cfg = load_config(ROOT / CONFIG, overrides)
    return resolve(cfg, 2, build_tokenizer(cfg.data.tokenizer).vocab_size)


def predict(cfg: Config, rate_mbit: float, flops_per_s: float, latency_s: float) -> float:
    model = cost_model(
        cfg, get_device("cpu"), flops_per_s=flops_per_s, cluster=cluster(rate_mbit, latency_s)
    )
    blocks = cfg.parallel.pipeline_blocks if cfg.parallel.pp > 1 else (cfg.model.num_layers,)
    return model.evaluate(tuple(blocks)).step_time_s


def balanced_split(data_path: str, steps: int, rate_mbit: float) -> tuple[int, ...]:
    """The balancer's time-optimal split for B (nominal CPU rate: the split depends on the
    ratio of the stages' costs, not on the rate)."""
    cfg = case_config("B", data_path, steps, None)
    cfg = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, pipeline_blocks="auto")
    )
    model = cost_model(cfg, get_device("cpu"), cluster=cluster(rate_mbit, 0.0))
    return balance(cfg, get_device("cpu"), "time", model=model).blocks


def calibrate(
    cfgs: dict[str, Config], measured: dict[tuple[str, float], float], rate: float
) -> tuple[float, float]:
    """(FLOP/s from B at ``rate``, latency from A at ``rate``), fitted jointly."""
    flops, latency = 1e10, 0.0
    for _ in range(8):
        flops = fit_flops_per_s(
            lambda f, a=latency: predict(cfgs["B"], rate, f, a), measured["B", rate]
        )
        latency = fit_latency_s(
            lambda a, f=flops: predict(cfgs["A"], rate, f, a), measured["A", rate]
        )
    return flops, latency


def measure(args: argparse.Namespace, data_path: str, blocks: tuple[int, ...], logs: Path):
    """{(case, rate): [{"steps": step times, "median": s, ...} per launch]}.

    One launch per case and repeat sweeps every rate: the link is re-shaped in place
    (``tc qdisc change``) as soon as the step that ends a rate's window is logged, and the step
    under way during the switch is left out (``--settle``). So every rate is measured in the
    same processes, without a launch per point. Repeats alternate the sweep's direction (a
    drift in the machine's load then does not masquerade as a bandwidth effect) and run in
    rounds over the cases."""
    runs: dict[tuple[str, float], list[dict]] = {}
    per_rate = args.settle + args.steps
    total = args.warmup + len(args.rates) * per_rate
    with EmulatedCluster(2, args.rates[0]) as net:
        for repeat in range(args.repeats):
            order = args.rates if repeat % 2 == 0 else args.rates[::-1]
            for case in args.cases:
                overrides = [*MODEL, f"data.path={data_path}", f"train.steps={total}"]
                overrides += case_overrides(case, blocks)
                net.set_rate(order[0])
                busy = wait_for_quiet(args.quiet_wait)
                workdir = logs / f"{case}-{repeat}"
                launch = net.launch(ROOT / CONFIG, overrides, workdir, nice=args.nice)
                try:
                    for i, rate in enumerate(order):
                        if i > 0:
                            net.set_rate(rate)
                        first = args.warmup + i * per_rate + args.settle
                        records = launch.wait_for_records(first + args.steps, timeout_s=600)
                        steps = [r["step_time_s"] for r in records[first : first + args.steps]]
                        median = statistics.median(steps)
                        runs.setdefault((case, rate), []).append(
                            {"steps": steps, "median": median, "busy_cores_before": busy}
                        )
                        print(
                            f"  [{repeat + 1}/{args.repeats}] {case} at {rate:>7g} Mbit/s: "
                            f"median {median:.3f} s over steps {first + 1}-{first + args.steps}"
                            f" (other load before the launch: {busy:.2f} cores)",
                            flush=True,
                        )
                    launch.wait(600)
                finally:
                    launch.stop()
    return runs


def write_plot(
    path: str, rates: list[float], points: list[dict], dense: dict, summary: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"A": "tab:red", "B": "tab:blue"}
    for case in ("A", "B"):
        mine = [p for p in points if p["case"] == case]
        if not mine:
            continue
        xs, ys = zip(*dense[case])
        ax.plot(xs, ys, color=colors[case], label=f"{case} predicted: {CASES[case]}")
        ax.plot(
            [p["rate_mbit"] for p in mine],
            [p["measured_s"] for p in mine],
            "o",
            color=colors[case],
            label=f"{case} measured",
        )
        for p in mine:
            if p["role"] == "calibration":
                ax.plot(p["rate_mbit"], p["measured_s"], "o", markersize=13,
                        markerfacecolor="none", color="black")  # fmt: skip
    ax.plot([], [], "o", markersize=13, markerfacecolor="none", color="black",
            label="calibration point (the others are predicted)")  # fmt: skip
    lines = []
    for case, s in summary.items():
        drop = s["slowdown_1000_to_100"]
        if drop["measured"] is not None:
            lines.append(
                f"{case}: 1000 -> 100 Mbit/s slows a step {drop['measured']:.2f}x "
                f"(predicted {drop['predicted']:.2f}x)"
            )
    worst = max((abs(p["error"]) for p in points if p["role"] == "prediction"), default=0.0)
    lines.append(f"worst prediction error {worst:.1%} (target {TARGET:.0%})")
    ax.text(0.38, 0.56, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth between the two nodes (Mbit/s, tc tbf)")
    ax.set_ylabel("step time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Tensor vs pipeline parallelism over a weak link (2 emulated nodes, gloo, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(values: dict[float, float], slow: float, fast: float) -> float | None:
    if slow in values and fast in values:
        return values[slow] / values[fast]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", default="10000,3000,1000,300,100", help="link rates, Mbit/s, fastest first"
    )
    parser.add_argument("--cases", default="A,B")
    parser.add_argument("--steps", type=int, default=6, help="steps measured per rate")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the first rate")
    parser.add_argument(
        "--settle", type=int, default=1, help="steps left out after each change of rate"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="launches per case; their median is kept"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before each launch for other work on the machine to stop",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling priority of the runs (root: < 0 favours them over other work)",
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--keep-logs", default=None, help="keep the run logs in this directory")
    args = parser.parse_args()
    args.rates = sorted((float(r) for r in args.rates.split(",")), reverse=True)
    args.cases = args.cases.split(",")
    if args.steps < 1 or args.warmup < 0 or args.settle < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup and --settle >= 0")
    ok, reason = namespaces_supported()
    if not ok:
        print(f"skipped: {reason}")
        return 0
    from yuanlfa.data import ensure_default_corpus

    data_path = ensure_default_corpus("byte")  # tokenized once, outside the timed runs
    calib_rate = args.rates[0]
    blocks = balanced_split(data_path, args.steps, calib_rate)
    print(f"B's balanced split: {list(blocks)}; netem: {netem_supported()}", flush=True)
    logs_tmp = tempfile.mkdtemp(prefix="weak_link_")
    try:
        runs = measure(args, data_path, blocks, Path(args.keep_logs or logs_tmp))
    finally:
        shutil.rmtree(logs_tmp, ignore_errors=True)
    # The median over the launches: one launch disturbed (by load from elsewhere, or a lucky
    # or unlucky schedule) moves it least.
    measured = {key: statistics.median(r["median"] for r in reps) for key, reps in runs.items()}
    cfgs = {case: case_config(case, data_path, args.steps, blocks) for case in ("A", "B")}
    flops, latency = calibrate(cfgs, measured, calib_rate)
    points = []
    for (case, rate), reps in sorted(runs.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        pred = predict(cfgs[case], rate, flops, latency)
        err = pred / measured[case, rate] - 1
        role = "calibration" if rate == calib_rate else "prediction"
        points.append(
            {
                "case": case,
                "rate_mbit": rate,
                "measured_s": round(measured[case, rate], 4),
                "step_times_s": [[round(t, 4) for t in r["steps"]] for r in reps],
                "predicted_s": round(pred, 4),
                "error": round(err, 4),
                "role": role,
                "met": abs(err) <= TARGET if role == "prediction" else None,
                "launch_medians_s": [round(r["median"], 4) for r in reps],
                "busy_cores_before": [round(r["busy_cores_before"], 2) for r in reps],
            }
        )
    lo, hi = min(args.rates) * 0.8, max(args.rates) * 1.25
    grid = [lo * (hi / lo) ** (i / 40) for i in range(41)]
    dense = {c: [(x, predict(cfgs[c], x, flops, latency)) for x in grid] for c in ("A", "B")}
    summary = {}
    for case in args.cases:
        meas = {p["rate_mbit"]: p["measured_s"] for p in points if p["case"] == case}
        pred = {p["rate_mbit"]: p["predicted_s"] for p in points if p["case"] == case}
        summary[case] = {"layout": CASES[case]}
        for slow, fast in ((100, 1000), (1000, 10000), (100, 10000)):
            summary[case][f"slowdown_{fast}_to_{slow}"] = {
                "measured": ratio(meas, slow, fast),
                "predicted": ratio(pred, slow, fast),
            }
    predictions = [p for p in points if p["role"] == "prediction"]
    print()
    print(f"{'case':<4} {'Mbit/s':>8} {'measured s':>11} {'predicted s':>12} {'error':>8}  role")
    for p in points:
        mark = "" if p["met"] is None else ("  met" if p["met"] else "  NOT met")
        print(
            f"{p['case']:<4} {p['rate_mbit']:>8g} {p['measured_s']:>11.3f} "
            f"{p['predicted_s']:>12.3f} {p['error']:>+8.1%}  {p['role']}{mark}"
        )
    worst = max((abs(p["error"]) for p in predictions), default=0.0)
    met = all(p["met"] for p in predictions)
    print(
        f"calibration at {calib_rate:g} Mbit/s: {flops / 1e9:.1f} GFLOP/s sustained (B), "
        f"{latency * 1e3:.2f} ms per message (A); link payload {TCP_PAYLOAD_EFFICIENCY:.3f} of "
        "the rate"
    )
    print(f"worst prediction error {worst:.1%}: target {TARGET:.0%} {'met' if met else 'NOT met'}")
    for case, s in summary.items():
        m, p = s["slowdown_1000_to_100"]["measured"], s["slowdown_1000_to_100"]["predicted"]
        if m is not None:
            print(
                f"{case}: 1000 -> 100 Mbit/s (10x less) slows a step {m:.2f}x (predicted {p:.2f}x)"
            )
    if args.out:
        import torch

        result = {
            "benchmark": "weak_link",
            "date": datetime.date.today().isoformat(),
            "device": cpu_name(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "source": source_commit(),
            "netem": netem_supported(),
            "link_delay_ms": 0.0,
            "config": CONFIG,
            "overrides": MODEL,
            "cases": {
                c: {"layout": CASES[c], "overrides": case_overrides(c, blocks)} for c in CASES
            },
            "steps_per_rate": args.steps,
            "warmup": args.warmup,
            "settle": args.settle,
            "nice": args.nice,
            "calibration": {
                "rate_mbit": calib_rate,
                "flops_per_s": flops,
                "flops_from": f"B at {calib_rate:g} Mbit/s",
                "latency_s": latency,
                "latency_from": f"A at {calib_rate:g} Mbit/s",
                "link_payload_efficiency": TCP_PAYLOAD_EFFICIENCY,
            },
            "target_error": TARGET,
            "worst_prediction_error": round(worst, 4),
            "all_predictions_met": met,
            "points": points,
            "summary": summary,
            "repeats": args.repeats,
        }
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_plot(f"{args.out}.png", args.rates, points, dense, summary)
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
