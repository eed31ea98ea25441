"""Training step time on CPU: our pp=2 x dp=2 pipeline + ZeRO-1 vs DeepSpeed's PipelineModule.

Both sides train the same model (yuanlfa's own layers, same initial weights) on the same samples
of the embedded corpus, 4 gloo processes each (2 pipeline stages x 2 data-parallel replicas,
OMP_NUM_THREADS=1), fp32, AdamW with the same lr/betas/eps/weight decay, clipping at 1.0, the
same micro and global batch (so the same number of microbatches per step):
  - ours: ``yuanlfa.train.train`` as a user runs it (1F1B schedule of torch.distributed.pipelining,
    the sharded optimizer ``optim.distributed=true``); the step time is the trainer's own
    ``step_time_s`` record (batch loading, pipeline, gradient reduction, clipping, optimizer step
    and parameter all-gather);
  - DeepSpeed: ``deepspeed.pipe.PipelineModule`` with 2 stages (the embedding tied to the head
    with ``TiedLayerSpec``, 2 decoder layers per stage), ZeRO stage 1 with a torch AdamW client
    optimizer; the step time is the wall time of ``engine.train_batch`` (the same batch loading
    inside it, the pipeline, ZeRO-1 reduction, clipping, step and all-gather).
The medians after discarding warm-up steps, and their ratio ours / DeepSpeed, are printed for
each model size of ``--cases`` (HIDDENxSEQ): by default 256x256, where compute dominates (the
headline ratio), and 128x128 (the tiny config), where per-step framework overhead shows. The two
sides run alternately, ``--repeats`` launches each, so a change in the machine's load hits both.

DeepSpeed is only needed here (the library never imports it): ``pip install deepspeed``.

    python benchmarks/step_cpu.py            # 20 steps, 5 warm-up, 2 launches per side and case
    python benchmarks/step_cpu.py --out benchmarks/results/step_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import cpu_name  # benchmarks/ is on sys.path when a script runs

WORLD = 4  # pp 2 x dp 2
PP = 2
TARGET = 0.8  # issue #6: ours at most 0.8x DeepSpeed's step time
INSTALL_HINT = (
    "this benchmark compares against DeepSpeed, which is not installed here (it is not a "
    "dependency of yuanlfa); install it with: pip install deepspeed"
)


def config_dict(args: argparse.Namespace, data_path: str) -> dict:
    """The one configuration both sides run (DeepSpeed's side reads the same fields)."""
    return {
        "model": {
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "num_heads": args.heads,
            "vocab_size": None,
            "init_std": 0.02,
        },
        "parallel": {
            "tp": 1,
            "pp": PP,
            "pipeline_blocks": [args.layers // PP] * PP,
            "schedule": "1f1b",
        },
        "optim": {
            "lr": args.lr,
            "min_lr": args.lr,
            "weight_decay": 0.1,
            "beta1": 0.9,
            "beta2": 0.95,
            "clip_grad": 1.0,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "distributed": True,
        },
        "data": {"path": data_path, "tokenizer": "byte"},
        "train": {
            "steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.global_batch,
            "seq_length": args.seq,
            "seed": 1234,
            "precision": "fp32",
            "device": "cpu",
            "eval_interval": 0,
            "eval_iters": 0,
        },
        "logging": {"log_interval": 10**9},
    }


def write_result(path: str, step_times: list[float], losses: list[float], extra: dict) -> None:
    with open(path, "w") as f:
        json.dump({"step_times_s": step_times, "losses": losses, **extra}, f)


def worker_ours(args: argparse.Namespace) -> None:
    from yuanlfa.config import config_from_dict
    from yuanlfa.train import train

    cfg = config_from_dict(config_dict(args, args.data))
    result = train(cfg, progress=False)  # creates and destroys the gloo process group
    if int(os.environ["RANK"]) == 0:
        records = result.records
        write_result(
            args.result,
            [r["step_time_s"] for r in records],
            [r["loss"] for r in records],
            {"stage_busy_s": [r.get("stage_busy_s") for r in records]},
        )


def worker_deepspeed(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from torch import nn

    from yuanlfa.config import config_from_dict, resolve
    from yuanlfa.data import build_tokenizer
    from yuanlfa.data.build import build_datasets, get_batch
    from yuanlfa.model import create_model
    from yuanlfa.ops.rope import rope_cos_sin
    from yuanlfa.parallel.dp.zero import no_weight_decay

    cfg = config_from_dict(config_dict(args, args.data))
    cfg = resolve(cfg, WORLD, build_tokenizer(cfg.data.tokenizer).vocab_size)
    m, t, o = cfg.model, cfg.train, cfg.optim
    seed = t.seed

    def piece(**kwargs):
        # Parameters are filled from (seed, global name): the same values as our trainer's.
        return create_model(m, seed, **kwargs)

    class EmbedPipe(nn.Module):
        """(tokens [b, s], position_ids [b, s]) -> (hidden [s, b, h], position_ids)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = piece(layer_ids=[], has_head=False).embed

        def forward(self, inputs):
            tokens, position_ids = inputs
            return self.embed(tokens.t()), position_ids

    def head(module: EmbedPipe, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, module.embed.weight)  # tied: [s, b, vocab]

    class DecoderPipe(nn.Module):
        def __init__(self, layer_id: int) -> None:
            super().__init__()
            model = piece(layer_ids=[layer_id], has_embedding=False, has_head=False)
            self.layer = model.layers[str(layer_id)]

        def forward(self, inputs):
            hidden, position_ids = inputs
            cos, sin = rope_cos_sin(position_ids.t(), m.head_dim, m.rope_base, hidden.dtype)
            return self.layer(hidden, cos, sin), position_ids

    class FinalNormPipe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = piece(layer_ids=[], has_embedding=False).final_norm

        def forward(self, inputs):
            return self.norm(inputs[0])

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The per-token mean over the microbatch; DeepSpeed averages over microbatches and
        # replicas, which is our global-batch mean (every token counts: the loss mask is 1).
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.t().reshape(-1))

    deepspeed.init_distributed(dist_backend="gloo")
    specs = [TiedLayerSpec("embed", EmbedPipe, tied_weight_attr="embed.weight")]
    specs += [LayerSpec(DecoderPipe, i) for i in range(m.num_layers)]
    specs += [
        LayerSpec(FinalNormPipe),
        TiedLayerSpec("embed", EmbedPipe, forward_fn=head, tied_weight_attr="embed.weight"),
    ]
    pipe = PipelineModule(
        layers=specs,
        num_stages=PP,
        loss_fn=loss_fn,
        partition_method="type:DecoderPipe",
        activation_checkpoint_interval=0,
    )
    decay, plain = [], []
    for name, p in pipe.named_parameters():
        (plain if no_weight_decay(name, p) else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": plain, "weight_decay": 0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    dp = WORLD // PP
    local_batch = t.global_batch_size // dp
    ds_config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": local_batch // t.micro_batch_size,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config)
    dp_rank = engine.grid.get_data_parallel_rank()

    data = build_datasets(
        cfg.data,
        vocab_size=m.vocab_size,
        seq_length=t.seq_length,
        train_samples=t.steps * t.global_batch_size,
        valid_samples=0,
        seed=seed,
        progress=False,
    )

    def microbatches():
        # The samples our trainer feeds this replica, in the same order, loaded lazily (inside
        # the timed step, as in ours) by the stages that read them (first and last).
        device = torch.device("cpu")
        for step in range(t.steps):
            start = step * t.global_batch_size + dp_rank * local_batch
            for mb in range(local_batch // t.micro_batch_size):
                b = get_batch(
                    data.train, start + mb * t.micro_batch_size, t.micro_batch_size, device
                )
                yield (b["tokens"], b["position_ids"]), b["labels"]

    it = microbatches()
    times, losses = [], []
    for _ in range(t.steps):
        started = time.perf_counter()
        loss = engine.train_batch(data_iter=it)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
    if torch.distributed.get_rank() == 0:
        # Layer boundaries of the stages, e.g. [0, 3, 7]: embedding + 2 layers | 2 layers +
        # final norm + head.
        write_result(args.result, times, losses, {"partition": [int(x) for x in pipe.parts]})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def worker_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("steps", "layers", "hidden", "heads", "seq", "micro_batch", "global_batch", "lr"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + ["--data", args.data]


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Launch one side under torchrun (4 processes) and return rank 0's records."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, f"{side}.json")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={WORLD}",
            __file__,
            "--worker",
            side,
            "--result",
            result,
            *worker_args(args),
        ]
        # One thread per process: 4 processes share the machine's cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not os.path.isfile(result):
            sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
            raise SystemExit(f"{side}: the torchrun launch failed (exit {proc.returncode})")
        with open(result) as f:
            out = json.load(f)
    out["launch_wall_s"] = round(wall, 1)
    # The 1-minute load average before and after: other jobs on the machine skew timings.
    out["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return out


def summarize(launches: list[dict], warmup: int) -> dict:
    """Pool the timed steps (after warm-up) of every launch of one side."""
    timed = [x for run in launches for x in run["step_times_s"][warmup:]]
    return {
        "median_step_s": statistics.median(timed),
        "min_step_s": min(timed),
        "max_step_s": max(timed),
        "first_loss": launches[0]["losses"][0],
        "last_loss": launches[0]["losses"][-1],
        "launches": launches,
    }


def run_case(args: argparse.Namespace, hidden: int, seq: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "hidden": hidden, "seq": seq})
    microbatches = args.global_batch // (args.micro_batch * (WORLD // PP))
    print(
        f"\n== hidden {hidden}, seq {seq}: {args.layers} layers, {args.heads} heads, micro "
        f"{args.micro_batch}, global {args.global_batch} ({microbatches} microbatches per "
        f"replica), fp32, {args.steps} steps ({args.warmup} warm-up discarded), "
        f"{args.repeats} launches per side",
        flush=True,
    )
    launches: dict[str, list[dict]] = {"ours": [], "deepspeed": []}
    # Alternate the sides so that a change in the machine's load hits both alike.
    for repeat in range(args.repeats):
        for side in launches:
            print(f"running {side} ({repeat + 1}/{args.repeats}) ...", flush=True)
            launches[side].append(run_side(side, args))
    results = {side: summarize(runs, args.warmup) for side, runs in launches.items()}
    ratio = results["ours"]["median_step_s"] / results["deepspeed"]["median_step_s"]
    print(f"{'side':<10} {'median s':>9} {'min s':>7} {'max s':>7} {'loss first -> last':>20}")
    for side, r in results.items():
        print(
            f"{side:<10} {r['median_step_s']:>9.4f} {r['min_step_s']:>7.4f} "
            f"{r['max_step_s']:>7.4f} {r['first_loss']:>10.4f} -> {r['last_loss']:.4f}"
        )
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"ours / DeepSpeed median step time: {ratio:.3f} (target <= {TARGET}: {verdict})")
    return {
        "hidden": hidden,
        "seq_length": seq,
        "ours": results["ours"],
        "deepspeed": results["deepspeed"],
        "ratio_ours_over_deepspeed": ratio,
        "target_met": ratio <= TARGET,
    }


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        try:
            hidden, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--cases: {item!r} is not HIDDENxSEQ (e.g. 256x256)"
            ) from None
        cases.append((hidden, seq))
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps discarded before the median")
    p.add_argument(
        "--cases",
        type=parse_cases,
        default=parse_cases("256x256,128x128"),
        help="model sizes as HIDDENxSEQ, comma-separated; the first is the headline "
        "(default: 256x256, compute-bound, and 128x128, the tiny config, overhead-bound)",
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=2, help="launches per side, alternating")
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "deepspeed"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "ours":
        worker_ours(args)
        return 0
    if args.worker == "deepspeed":
        worker_deepspeed(args)
        return 0

    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.layers % PP:
        p.error(f"--layers {args.layers} must be divisible by the {PP} pipeline stages")
    if args.global_batch % (args.micro_batch * (WORLD // PP)):
        p.error("--global-batch must be a multiple of --micro-batch * dp (2)")
    if importlib.util.find_spec("deepspeed") is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2

    from yuanlfa.data import ensure_default_corpus

    args.data = ensure_default_corpus("byte", progress=True)
    print(
        f"pp {PP} x dp {WORLD // PP} on CPU/gloo, {WORLD} processes per side, "
        f"OMP_NUM_THREADS=1, {cpu_name()} ({os.cpu_count()} cores)",
        flush=True,
    )
    cases = [run_case(args, hidden, seq) for hidden, seq in args.cases]

    print(f"\n{'case':<12} {'ours s':>8} {'DeepSpeed s':>12} {'ours/DS':>8}")
    for c in cases:
        name = f"h{c['hidden']} s{c['seq_length']}"
        print(
            f"{name:<12} {c['ours']['median_step_s']:>8.4f} "
            f"{c['deepspeed']['median_step_s']:>12.4f} {c['ratio_ours_over_deepspeed']:>8.3f}"
        )

    if args.out:
        import torch

        payload = {
            "benchmark": "step_cpu",
            "device": cpu_name(),
            "cores": os.cpu_count(),
            "torch_version": torch.__version__,
            "deepspeed_version": _version("deepspeed"),
            "yuanlfa_version": _version("yuanlfa"),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {
                "world": WORLD,
                "pp": PP,
                "dp": WORLD // PP,
                "tp": 1,
                "layers": args.layers,
                "heads": args.heads,
                "vocab": 384,
                "micro_batch": args.micro_batch,
                "global_batch": args.global_batch,
                "microbatches_per_replica": args.global_batch // (args.micro_batch * (WORLD // PP)),
                "precision": "fp32",
                "optimizer": "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 (not on 1-D "
                "parameters and biases), clip 1.0",
                "lr": args.lr,
                "lr_schedule": "constant",
                "steps": args.steps,
                "warmup_discarded": args.warmup,
                "launches_per_side": args.repeats,
                "OMP_NUM_THREADS": 1,
                "backend": "gloo",
                "ours": "yuanlfa.train.train: 1F1B (torch.distributed.pipelining), blocks [2, 2], "
                "optim.distributed=true (ZeRO-1); step time = the trainer's step_time_s",
                "deepspeed": "PipelineModule (TiedLayerSpec embedding/head, partition "
                "type:DecoderPipe -> embedding + 2 layers | 2 layers + norm + head), ZeRO stage "
                "1, torch AdamW client optimizer; step time = wall time of engine.train_batch",
                "data": "the same samples of the embedded corpus (byte tokens) on both sides, "
                "loaded inside the timed step",
                "statistic": "median over the pooled timed steps of all launches, rank 0",
            },
            "cases": cases,
            "headline_ratio_ours_over_deepspeed": cases[0]["ratio_ours_over_deepspeed"],
            "target": f"ratio <= {TARGET}",
            "target_met": cases[0]["target_met"],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
