"""Islands + DiLoCo against synchronous data parallelism at the same tokens: eval loss curves.

The tiny model on the embedded corpus (configs/tiny.yaml, byte tokenizer), one gloo process per
island under ``torchrun --standalone``: for each N in ``--islands`` (default 2, 4), synchronous
dp = N (``outer.algorithm: none``, today's behaviour) and N islands with ``outer.algorithm:
diloco`` for each H in ``--sync-every`` (default 10, 50) and each outer optimizer in ``--outer``
(default DiLoCo's Nesterov SGD, lr 0.7 momentum 0.9, and lr 1 without momentum, which is model
averaging every H steps: DiLoCo's outer settings were tuned for H = 500 and an outer step of
momentum 0.9 moves up to 7x the averaged change, too far at small H). Every run sees the same
global batch (split over the islands), the same steps, hence the same tokens. It records each
run's eval loss curve and final eval loss and checks the goal of issue 20: at H = 10 the final
eval loss within 3% of synchronous dp's.

    python benchmarks/islands_quality.py --out benchmarks/results/islands_quality_cpu

The defaults run in about 15 minutes on 2 cores (4 processes share them for N = 4); ``--steps``,
``--layers``, ``--hidden``, ``--seq`` and ``--global-batch`` scale it; ``--set KEY=VALUE ...``
changes inner settings (``optim.lr``, ``train.seed``) for every run alike, the baseline included,
and ``--quantize`` sends the islands' pseudo-gradients in bf16. Recipes for the islands runs
only: ``--warm-start K,...`` (``outer.warm_start_steps``: K synchronous steps first) and
``--average-moments none,first,both`` (``outer.average_moments``: the inner AdamW moments averaged
at each outer step); ``--baseline-from OLD.json`` reuses OLD's synchronous runs (same settings)
for exploring. Needs the islands in the
config schema (``parallel.islands``, ``outer:``); without them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _emulated import source_commit
from _env import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from islands_weak_link import islands_in_schema  # noqa: E402

TARGET = 0.03  # final eval loss within 3% of synchronous dp's at H = 10


def overrides(args: argparse.Namespace, jsonl: Path) -> list[str]:
    return [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"train.seq_length={args.seq}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}",
        f"train.steps={args.steps}",
        f"train.eval_interval={args.eval_interval}",
        f"train.eval_iters={args.eval_iters}",
        "train.device=cpu",
        "checkpoint.save_at_end=false",
        f"logging.jsonl={jsonl}",
        "logging.log_interval=1",
        *args.set,
    ]


def run(args: argparse.Namespace, name: str, n: int, extra: list[str], work: Path) -> dict:
    jsonl = work / f"{name}.jsonl"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
        "-m", "yuanlfa.cli.train", "--config", str(ROOT / "configs/tiny.yaml"), "--quiet",
        "--set", *overrides(args, jsonl), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not evals:
        raise SystemExit(f"error: {name} logged no eval_loss; use --eval-interval > 0")
    out = {
        "name": name,
        "processes": n,
        "overrides": extra,
        "wall_s": round(time.perf_counter() - started, 1),
        "eval": evals,
        "train_loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "final_eval_loss": evals[-1][1],
        "link_bytes_total": sum(r.get("link_bytes", 0) or 0 for r in records),
    }
    print(f"  {name}: final eval loss {out['final_eval_loss']:.4f} ({out['wall_s']:.0f} s)",
          flush=True)  # fmt: skip
    return out


def _stored_baselines(args: argparse.Namespace, error) -> dict[int, dict]:
    """The synchronous dp runs of an earlier result with the same settings, by island count."""
    try:
        old = json.loads(Path(args.baseline_from).read_text())
    except (OSError, ValueError) as exc:
        error(f"--baseline-from {args.baseline_from}: cannot read it ({exc})")
    same = ("steps", "layers", "hidden", "seq", "micro_batch", "global_batch", "eval_interval",
            "eval_iters", "set")  # fmt: skip
    differ = [k for k in same if old["settings"].get(k) != getattr(args, k)]
    if differ:
        key = differ[0]
        error(
            f"--baseline-from {args.baseline_from}: its runs had other settings ({key}: "
            f"{old['settings'].get(key)!r}); the baseline must train the same way"
        )
    return {r["processes"]: r for r in old["runs"] if not r["overrides"]}


def write_plot(path: str, runs: list[dict], islands: list[int]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: the plot is left out (pip install -e '.[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(islands), figsize=(6 * len(islands), 4.5), squeeze=False)
    for ax, n in zip(axes[0], islands):
        for r in runs:
            if r["processes"] != n:
                continue
            xs, ys = zip(*r["eval"])
            ax.plot(xs, ys, "o-", markersize=3, label=f"{r['name']} ({r['final_eval_loss']:.3f})")
        ax.set_title(f"{n} islands vs synchronous dp = {n} (same tokens)")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--islands", default="2,4", help="island counts (one process each)")
    parser.add_argument("--sync-every", default="10,50", help="H values")
    parser.add_argument(
        "--outer", default="0.7:0.9,1.0:0", help="outer optimizers, LR:MOMENTUM (Nesterov if > 0)"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every run, the synchronous baseline included (the inner "
        "hyper-parameters stay identical): e.g. optim.lr=1.5e-3 optim.min_lr=1.5e-4",
    )
    parser.add_argument(
        "--quantize", action="store_true", help="islands send bf16 pseudo-gradients"
    )
    parser.add_argument(
        "--overlap",
        default=None,
        metavar="FRAGMENTS:DELAY",
        help="islands run DiLoCo with its exchange overlapped: streaming_diloco with FRAGMENTS "
        "fragments, each applied DELAY steps after its exchange starts, fragment_merge carry "
        "(as benchmarks/islands_weak_link.py's overlap cases: 2:4)",
    )
    parser.add_argument(
        "--warm-start",
        default="0",
        help="comma list of outer.warm_start_steps for the islands runs (a synchronous warm "
        "start: the first K steps reduce the gradients across the islands; 0: none)",
    )
    parser.add_argument(
        "--average-moments",
        default="none",
        help="comma list of outer.average_moments for the islands runs (none, first, both: "
        "average the inner AdamW moments over the islands at each outer step)",
    )
    parser.add_argument(
        "--baseline-from",
        default=None,
        metavar="JSON",
        help="take the synchronous dp runs from this earlier result (same settings) instead of "
        "running them: for exploring; committed figures run their baseline",
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = parser.parse_args()
    try:
        islands = [int(x) for x in args.islands.split(",")]
        hs = [int(x) for x in args.sync_every.split(",")]
        outers = [tuple(float(v) for v in x.split(":")) for x in args.outer.split(",")]
        warm_starts = [int(x) for x in args.warm_start.split(",")]
    except ValueError:
        parser.error(
            "--islands, --sync-every and --warm-start: comma lists of integers (2,4; 10,50; "
            "0,100); "
            "--outer: a comma list of LR:MOMENTUM (0.7:0.9,1.0:0)"
        )
    if any(len(o) != 2 or o[0] <= 0 or not 0 <= o[1] < 1 for o in outers):
        parser.error("--outer: each LR:MOMENTUM with LR > 0 and 0 <= MOMENTUM < 1 (0.7:0.9)")
    moments = args.average_moments.split(",")
    if any(m not in ("none", "first", "both") for m in moments):
        parser.error("--average-moments: a comma list of none, first, both")
    if args.overlap is not None and moments != ["none"]:
        parser.error("--average-moments needs DiLoCo (outer.algorithm diloco): drop --overlap")
    if min(islands) < 2 or min(hs) < 1 or min(warm_starts) < 0:
        parser.error("--islands: each >= 2; --sync-every: each >= 1; --warm-start: each >= 0")
    for n in islands:
        if args.global_batch % (args.micro_batch * n):
            parser.error(
                f"--global-batch {args.global_batch} must be a multiple of --micro-batch x "
                f"islands = {args.micro_batch * n}"
            )
    bad = [kv for kv in args.set if "=" not in kv or kv.startswith(("parallel.", "outer."))]
    if bad:
        parser.error(
            f"--set {bad[0]}: KEY=VALUE for the inner settings of every run, the baseline "
            "included; the islands and the outer loop come from --islands, --sync-every, "
            "--outer, --warm-start, --average-moments, --overlap and --quantize"
        )
    overlap = None
    if args.overlap is not None:
        try:
            overlap = tuple(int(v) for v in args.overlap.split(":"))
        except ValueError:
            overlap = ()
        if len(overlap) != 2 or any(h % overlap[0] or overlap[1] >= h // overlap[0] for h in hs):
            parser.error(
                f"--overlap {args.overlap}: FRAGMENTS:DELAY with FRAGMENTS dividing every H and "
                "DELAY below H / FRAGMENTS (e.g. 2:4 for H = 10)"
            )
    stored = _stored_baselines(args, parser.error) if args.baseline_from else {}
    if min(args.steps, args.eval_interval, args.eval_iters) < 1:
        parser.error("--steps, --eval-interval and --eval-iters must be >= 1")
    missing = islands_in_schema()
    if missing is not None:
        print(f"error: the config schema has no {missing} yet (issue 20's training side); "
              "merge it first", file=sys.stderr)  # fmt: skip
        return 2
    from yuanlfa.data import ensure_default_corpus

    ensure_default_corpus("byte")  # tokenized once, before the runs
    runs = []
    with tempfile.TemporaryDirectory(prefix="islands_quality_") as tmp:
        for n in islands:
            if n in stored:
                runs.append({**stored[n], "from": args.baseline_from})
                print(f"  {stored[n]['name']}: final eval loss {stored[n]['final_eval_loss']:.4f} "
                      f"(from {args.baseline_from})")  # fmt: skip
            else:
                runs.append(run(args, f"dp{n} (sync)", n, [], Path(tmp)))
            grid = itertools.product(hs, outers, warm_starts, moments)
            for h, (lr, momentum), warm, moment in grid:
                extra = [
                    f"parallel.islands={n}", "outer.algorithm=diloco", f"outer.sync_every={h}",
                    f"outer.lr={lr:g}", f"outer.momentum={momentum:g}",
                    f"outer.nesterov={'true' if momentum > 0 else 'false'}",
                ]  # fmt: skip
                name = f"{n} islands DiLoCo H={h} lr{lr:g} m{momentum:g}"
                if overlap is not None:
                    extra[1] = "outer.algorithm=streaming_diloco"
                    extra += [f"outer.fragments={overlap[0]}",
                              f"outer.fragment_delay={overlap[1]}",
                              "outer.fragment_merge=carry"]  # fmt: skip
                    name += f" overlap {overlap[0]}:{overlap[1]}"
                if args.quantize:
                    extra.append("outer.quantize=true")
                    name += " bf16"
                if warm:
                    extra.append(f"outer.warm_start_steps={warm}")
                    name += f" warm {warm}"
                if moment != "none":
                    extra.append(f"outer.average_moments={moment}")
                    name += f" moments {moment}"
                runs.append(run(args, name, n, extra, Path(tmp)))
    goals = []
    print()
    print(f"{'run':<40} {'final eval':>10} {'vs sync dp':>10}")
    for n in islands:
        base = next(r for r in runs if r["processes"] == n and not r["overrides"])
        for r in runs:
            if r["processes"] != n:
                continue
            gap = r["final_eval_loss"] / base["final_eval_loss"] - 1
            r["gap_vs_sync"] = round(gap, 4)
            print(f"{r['name']:<40} {r['final_eval_loss']:>10.4f} {gap:>+10.2%}")
            if "outer.sync_every=10" in r["overrides"]:
                goals.append({"run": r["name"], "gap": round(gap, 4), "met": gap <= TARGET})
    for g in goals:
        print(f"{'met' if g['met'] else 'NOT met':>7}: {g['run']} within 3% of sync dp "
              f"({g['gap']:+.2%})")  # fmt: skip
    if args.out:
        import torch

        result = {
            "benchmark": "islands_quality",
            "date": datetime.date.today().isoformat(),
            "device": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "source": source_commit(),
            "settings": vars(args),
            "target": TARGET,
            "goals": goals,
            "runs": runs,
        }
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_plot(f"{args.out}.png", runs, islands)
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
