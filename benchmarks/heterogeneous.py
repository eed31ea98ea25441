"""A heterogeneous pipeline, emulated on CPU: 4 pipeline ranks, 2 of them at half speed.

Each split is trained by its own ``yuanlfa-train`` launch (torchrun, gloo, pp 4, dp 1, fp32,
1F1B). The slow ranks (``--slow``, default the last two) run at ``--speed`` (default 0.5) in one
of two ways:

  paced     (default) every rank's pipeline ops are paced (``emulate.pace``,
            yuanlfa/parallel/pp/pacing.py): an op lasts its own thread CPU time x pace / speed,
            so ranks may share cores (this machine: 2 cores for 4 ranks, with other work) as long
            as pace exceeds the ranks per free core; ``stage_overrun_s`` in the log says when it
            did not. The emulated devices run at 1/pace of a core (fast) and half that (slow).
  throttle  each rank pinned to a core of its own, the slow ones stopped part of every 20 ms
            (yuanlfa/train/throttle.py); needs 4 free cores.

Three splits of the same model, alternating over ``--repeats`` rounds:

  uniform      layers as even as they go (layout.uniform_blocks);
  homogeneous  the balancer's time-optimal split when every rank is taken to be equally fast;
  aware        the balancer's split with each rank's speed (cost_model(..., speeds=...)).

Each launch's figure is the median ``step_time_s`` of the trainer's log after ``--warmup``
steps (in paced mode without the steps where a rank's ops overran their paced time by more than
2% of the step, while two steps remain: those measured the machine's load); the trainer's
per-rank ``stage_busy_s`` is recorded next to the cost model's per-rank prediction
(microbatches x the rank's time per microbatch). The cost model's sustained FLOP/s of a
full-speed rank is fitted on one measured point (the homogeneous split's step); the uniform and
aware points are predictions, each one's error checked against 15%. The goal: aware at least
1.3x faster than homogeneous.

    OMP_NUM_THREADS=1 python benchmarks/heterogeneous.py --out benchmarks/results/heterogeneous_cpu
    python benchmarks/heterogeneous.py --steps 4 --warmup 1 --layers 8 --hidden 64 --repeats 1
    python benchmarks/heterogeneous.py --mode throttle      # with 4 free cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._env import cpu_name, package_version  # noqa: E402
from yuanlfa.config import config_from_dict, resolve  # noqa: E402
from yuanlfa.layout import uniform_blocks  # noqa: E402
from yuanlfa.planner.balance import balance  # noqa: E402
from yuanlfa.planner.calibrate import fit_flops_per_s  # noqa: E402
from yuanlfa.planner.cost import cost_model  # noqa: E402
from yuanlfa.planner.devices import PRESETS  # noqa: E402
from yuanlfa.train.throttle import Throttle  # noqa: E402

PP = 4
SPLITS = ("uniform", "homogeneous", "aware")
TOLERANCE = 0.15
OVERRUN_SHARE = 0.02
GOAL = 1.3


def config_dict(args: argparse.Namespace, blocks: tuple[int, ...] | str, jsonl: str) -> dict:
    return {
        "model": {
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "num_heads": args.heads,
            # Beyond the byte tokenizer's 384 (unused rows): the last stage's head and loss
            # cost some of a layer, so that the split must weigh them.
            "vocab_size": args.vocab,
        },
        "parallel": {"pp": PP, "dp": 1, "schedule": "1f1b", "pipeline_blocks": blocks},
        "data": {"tokenizer": "byte", "split": "100,0,0", "num_workers": 0},
        "train": {
            "steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.global_batch,
            "seq_length": args.seq,
            "precision": "fp32",
            "device": "cpu",
            "eval_interval": 0,
            "eval_iters": 0,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "logging": {"jsonl": jsonl, "log_interval": 1},
        "emulate": {"pace": args.pace, "speeds": list(args.speeds)} if args.mode == "paced" else {},
    }


def cost(args: argparse.Namespace, blocks, flops: float | None, speeds) -> object:
    cfg = resolve(config_from_dict(config_dict(args, tuple(blocks), "x.jsonl")), PP)
    return cost_model(cfg, PRESETS["cpu"], flops_per_s=flops, speeds=speeds, gpu=False)


def plan_splits(args: argparse.Namespace, speeds: tuple[float, ...]) -> dict[str, tuple]:
    cfg = resolve(config_from_dict(config_dict(args, "auto", "x.jsonl")), PP)
    same = cost_model(cfg, PRESETS["cpu"], gpu=False)
    aware = cost_model(cfg, PRESETS["cpu"], gpu=False, speeds=speeds)
    return {
        "uniform": uniform_blocks(args.layers, PP),
        "homogeneous": balance(cfg, objective="time", model=same).blocks,
        "aware": balance(cfg, objective="time", model=aware).blocks,
    }


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def _rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    value = env.get(b"RANK")
    return int(value) if value is not None else None


def find_workers(launcher: subprocess.Popen, timeout_s: float = 120) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (torchrun's children with RANK set)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and launcher.poll() is None:
        found = {}
        for child in _children(launcher.pid):
            rank = _rank(child)
            if rank is not None:
                found[rank] = child
        if len(found) == PP:
            return found
        time.sleep(0.2)
    raise SystemExit(f"the {PP} workers did not appear within {timeout_s:.0f} s")


def launch(args, name: str, blocks, speeds, cores: list[int] | None) -> dict:
    """One training launch of ``blocks``, slow ranks throttled; its log records."""
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "log.jsonl")
        path = os.path.join(tmp, "cfg.yaml")
        Path(path).write_text(yaml.safe_dump(config_dict(args, list(blocks), jsonl)))
        run = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PP}"]
        cmd = [sys.executable, *run, "-m", "yuanlfa.cli.train", "--config", path, "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        throttles = []
        try:
            workers = find_workers(proc)
            for rank, pid in workers.items():
                if cores is not None:
                    os.sched_setaffinity(pid, {cores[rank]})
                if args.mode == "throttle" and speeds[rank] < 1:
                    throttles.append(Throttle(pid, speeds[rank], args.period_ms / 1e3).start())
            out, _ = proc.communicate(timeout=args.timeout)
        finally:
            for t in throttles:
                t.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            sys.stderr.write(out.decode(errors="replace")[-4000:])
            raise SystemExit(f"{name}: the launch failed (exit {proc.returncode})")
        records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line]
    timed = [r for r in records if "step_time_s" in r][args.warmup :]
    if not timed:
        raise SystemExit(f"{name}: no step after the {args.warmup} warm-up steps")
    overrun = [max(r.get("stage_overrun_s", [0.0] * PP)[k] for r in timed) for k in range(PP)]
    # A step where some rank's ops overran their paced time by more than OVERRUN_SHARE of the
    # step (the cores were too busy for the pace) measures the load, not the emulated devices:
    # left out while at least two steps remain.
    clean = [r for r in timed if max(r.get("stage_overrun_s", [0.0])) <= OVERRUN_SHARE * r[
        "step_time_s"]]  # fmt: skip
    used = clean if len(clean) >= 2 else timed
    busy = [statistics.median(r["stage_busy_s"][k] for r in used) for k in range(PP)]
    return {
        "split": name,
        "blocks": list(blocks),
        "step_time_s": statistics.median(r["step_time_s"] for r in used),
        "step_times_s": [r["step_time_s"] for r in timed],
        "steps_left_out": len(timed) - len(used),
        "stage_busy_s": busy,
        "stage_overrun_s_max": overrun,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_1min": os.getloadavg()[0],
    }


def write_plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["splits"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r["step_time_s"] for r in rows], 0.4, label="measured")
    left.bar([x + 0.2 for x in xs], [r["predicted_step_s"] for r in rows], 0.4, label="predicted")
    left.set_xticks(list(xs), [f"{r['split']}\n{r['blocks']}" for r in rows])
    left.set_ylabel("step time (s)")
    left.set_title(f"pp 4, ranks {result['slow_ranks']} at speed {result['speed']}")
    left.legend()
    for i, r in enumerate(rows):
        right.plot(range(PP), r["stage_busy_s"], "o-", label=f"{r['split']} measured")
        right.plot(range(PP), r["predicted_busy_s"], "x--", color=f"C{i}", alpha=0.6)
    right.set_xlabel("pipeline rank")
    right.set_ylabel("busy s per step (x: predicted)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("paced", "throttle"), default="paced")
    p.add_argument("--pace", type=float, default=8.0, help="paced mode: >= ranks per free core")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slow", default="2,3", help="pipeline ranks to throttle")
    p.add_argument("--speed", type=float, default=0.5)
    p.add_argument("--period-ms", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the three splits")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument(
        "--allow-shared", action="store_true", help="throttle mode with < 4 free cores (smoke)"
    )
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")
    p.add_argument("--render", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json")
    args = p.parse_args()
    if args.render:
        write_outputs(args.out, json.loads(Path(args.out + ".json").read_text()))
        return 0
    slow = [int(x) for x in args.slow.split(",") if x]
    speeds = tuple(args.speed if r in slow else 1.0 for r in range(PP))
    args.speeds = speeds
    cores = sorted(os.sched_getaffinity(0))
    pinned = cores[:PP] if len(cores) >= PP and args.mode == "throttle" else None
    if args.mode == "throttle" and pinned is None and not args.allow_shared:
        print(f"needs {PP} cores, this process may use {len(cores)}: the ranks would share cores "
              "and a stopped rank would hand its core to another; --allow-shared for a smoke "
              "run", file=sys.stderr)  # fmt: skip
        return 1
    splits = plan_splits(args, speeds)
    runs: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for i in range(args.repeats):
        order = SPLITS if i % 2 == 0 else SPLITS[::-1]
        for name in order:
            runs[name].append(launch(args, name, splits[name], speeds, pinned))
            print(f"{name} {splits[name]}: {runs[name][-1]['step_time_s']:.3f} s", flush=True)
    measured = {n: statistics.median(r["step_time_s"] for r in runs[n]) for n in SPLITS}

    def predict(name: str, flops: float):
        return cost(args, splits[name], flops, speeds).evaluate(splits[name])

    flops = fit_flops_per_s(
        lambda f: predict("homogeneous", f).step_time_s, measured["homogeneous"]
    )
    rows = []
    for name in SPLITS:
        plan = predict(name, flops)
        rows.append({
            "split": name,
            "blocks": list(splits[name]),
            "step_time_s": measured[name],
            "predicted_step_s": plan.step_time_s,
            "error": plan.step_time_s / measured[name] - 1,
            "fitted": name == "homogeneous",
            "stage_busy_s": [statistics.median(r["stage_busy_s"][k] for r in runs[name])
                             for k in range(PP)],
            "predicted_busy_s": [plan.num_microbatches * r.time_s for r in plan.ranks],
            "launches": runs[name],
        })  # fmt: skip
    speedup = measured["homogeneous"] / measured["aware"]
    aware_error = rows[2]["error"]
    result = {
        "machine": {
            "cpu": cpu_name(),
            "cores": len(cores),
            "cores_pinned": pinned,
            "torch": package_version("torch"),
        },
        "mode": args.mode,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "shared_cores": pinned is None,
        "pace": args.pace if args.mode == "paced" else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "speeds")},
        "slow_ranks": slow,
        "speed": args.speed,
        "fitted_flops_per_s": flops,
        "splits": rows,
        "aware_vs_homogeneous": speedup,
        "goal_speedup": GOAL,
        "speedup_met": speedup >= GOAL,
        "aware_prediction_within_15pct": abs(aware_error) <= TOLERANCE,
    }
    text = report(result)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        write_outputs(args.out, result)
    return 0


def report(result: dict) -> str:
    """The results as Markdown tables: step times, then busy time per rank."""
    lines = ["| split | blocks | measured s | predicted s | error |", "|---|---|---|---|---|"]
    for r in result["splits"]:
        mark = " (fitted)" if r["fitted"] else ""
        lines.append(f"| {r['split']} | {r['blocks']} | {r['step_time_s']:.3f} | "
                     f"{r['predicted_step_s']:.3f}{mark} | {r['error']:+.1%} |")  # fmt: skip
    speedup, goal = result["aware_vs_homogeneous"], result["goal_speedup"]
    lines.append(f"\naware vs homogeneous: {speedup:.2f}x (goal {goal}x)\n")
    lines.append("busy seconds per step, measured / predicted, per pipeline rank:\n")
    lines.append("| split | " + " | ".join(f"rank {k}" for k in range(PP)) + " |")
    lines.append("|---" * (PP + 1) + "|")
    for r in result["splits"]:
        cells = [f"{m:.2f} / {p:.2f}" for m, p in zip(r["stage_busy_s"], r["predicted_busy_s"])]
        lines.append(f"| {r['split']} | " + " | ".join(cells) + " |")
    overrun = max(max(x["stage_overrun_s_max"]) for r in result["splits"] for x in r["launches"])
    load = [x["loadavg_1min"] for r in result["splits"] for x in r["launches"]]
    left_out = sum(x.get("steps_left_out", 0) for r in result["splits"] for x in r["launches"])
    lines.append(
        f"\nmode {result['mode']}, pace {result['pace']}, ranks {result['slow_ranks']} at speed "
        f"{result['speed']}; 1-minute load average {min(load):.1f} to {max(load):.1f} on "
        f"{result['machine']['cores']} cores; largest overrun of the pace in any step and rank: "
        f"{overrun:.3f} s; steps left out for overruns over {OVERRUN_SHARE:.0%} of the step: "
        f"{left_out}"
    )
    return "\n".join(lines)


def write_outputs(out: str, result: dict) -> None:
    s = result["settings"]
    model = (f"{s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, seq {s['seq']}, "
             f"micro-batch {s['micro_batch']}, global batch {s['global_batch']}")  # fmt: skip
    Path(out + ".md").write_text(
        "# Emulated heterogeneous pipeline (CPU)\n\n`OMP_NUM_THREADS=1 python "
        f"benchmarks/heterogeneous.py --out {out}` ({model}; {result['date']})\n\n"
        + report(result)
        + "\n"
    )
    write_plot(out + ".png", result)


if __name__ == "__main__":
    raise SystemExit(main())
