"""The paper's attention ablation (Yuan 2.0, Table 1) at toy scale, on CPU.

Trains the tiny model (configs/tiny.yaml: 4 layers, hidden 128, byte tokenizer, the embedded
default corpus) once per filter variant with the same seed, data order and step budget, and
prints a side-by-side table of parameters, held-out loss and median step time:

    attention only        model.filter: none
    1 conv, kernel k      model.filter: conv, model.filter_kernel: k  (k = 1, 2, 3, 7)
    LFA without RMSNorm   model.filter: lfa_no_norm
    LFA (default)         model.filter: lfa

A toy run on a few MB of Python source says far less than the paper's runs: read the loss column
as a smoke test of the variants, not as a reproduction of the paper's numbers.

    python examples/filter_variants.py                      # ~5 minutes, 2 idle cores
    python examples/filter_variants.py --steps 30 --variants none lfa
    python examples/filter_variants.py --out benchmarks/results/filter_variants_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from yuanlfa.config import config_from_dict, config_to_dict, load_config, resolve
from yuanlfa.data import build_tokenizer
from yuanlfa.model import build_model
from yuanlfa.train import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": ("attention only (no filter)", {"filter": "none"}),
    "conv1": ("1 conv, kernel 1", {"filter": "conv", "filter_kernel": 1}),
    "conv2": ("1 conv, kernel 2", {"filter": "conv", "filter_kernel": 2}),
    "conv3": ("1 conv, kernel 3", {"filter": "conv", "filter_kernel": 3}),
    "conv7": ("1 conv, kernel 7", {"filter": "conv", "filter_kernel": 7}),
    "lfa_no_norm": ("LFA: 2 convs, kernel 2, no RMSNorm", {"filter": "lfa_no_norm"}),
    "lfa": ("LFA: 2 convs, kernel 2 + RMSNorm (default)", {"filter": "lfa"}),
}


def base_config(steps: int) -> dict:
    """configs/tiny.yaml with the step budget, evaluation only at the end over 8 batches."""
    raw = config_to_dict(load_config(ROOT / "configs" / "tiny.yaml"))
    raw["train"].update(steps=steps, eval_interval=0, eval_iters=8)
    raw["optim"]["warmup_steps"] = max(1, steps // 15)
    raw["logging"]["log_interval"] = steps
    return raw


def parameters(cfg) -> int:
    vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    model_cfg = resolve(cfg, world_size=1, tokenizer_vocab=vocab).model
    return sum(p.numel() for p in build_model(model_cfg).parameters())  # meta: no memory


def run_variant(key: str, steps: int, warmup: int) -> dict:
    label, model = VARIANTS[key]
    raw = base_config(steps)
    raw["model"].update(model)
    cfg = config_from_dict(raw)
    started = time.perf_counter()
    records = train(cfg, progress=False).records
    times = [r["step_time_s"] for r in records[warmup:]] or [r["step_time_s"] for r in records]
    return {
        "variant": key,
        "label": label,
        "model": model,
        "params": parameters(cfg),
        "eval_loss": records[-1]["eval_loss"],
        "train_loss_last": records[-1]["loss"],
        "median_step_s": statistics.median(times),
        "wall_s": time.perf_counter() - started,
    }


def table(rows: list[dict]) -> str:
    base = next((r["params"] for r in rows if r["variant"] == "none"), None)
    lines = [
        "| variant | model.filter | parameters | vs no filter | eval loss | median step s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        spec = ", ".join(f"{k}={v}" for k, v in r["model"].items())
        extra = f"+{100 * (r['params'] / base - 1):.1f}%" if base else "-"
        lines.append(
            f"| {r['label']} | {spec} | {r['params']:,} | {extra} | {r['eval_loss']:.4f} | "
            f"{r['median_step_s']:.4f} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _env import cpu_name

    return {
        "device": f"cpu ({cpu_name()})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        # Step times are only comparable on an otherwise idle machine.
        "loadavg_1min_at_end": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", help="write OUT.json and OUT.md (e.g. benchmarks/results/...)")
    args = parser.parse_args(argv)
    rows = []
    for key in args.variants:
        row = run_variant(key, args.steps, args.warmup)
        print(
            f"{row['label']}: eval loss {row['eval_loss']:.4f}, {row['params']:,} parameters, "
            f"{row['median_step_s']:.4f} s/step ({row['wall_s']:.0f} s)",
            flush=True,
        )
        rows.append(row)
    env = environment()
    text = table(rows)
    print()
    print(text)
    if args.out:
        write_results(Path(args.out), rows, env, base_config(args.steps), args.warmup)


def write_results(out: Path, rows: list[dict], env: dict, setup: dict, warmup: int) -> None:
    """OUT.json (everything) and OUT.md (the table with how it was made)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    command = f"python examples/filter_variants.py --out {shown}"
    result = {"environment": env, "config": setup, "command": command, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    tr, model = setup["train"], setup["model"]
    load = env["loadavg_1min_at_end"]
    header = (
        "# Filter variants (the paper's Table 1 ablation), CPU\n\n"
        f"`{command}`: configs/tiny.yaml ({model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, byte tokenizer, embedded corpus), {tr['steps']} steps of "
        f"{tr['global_batch_size']} x {tr['seq_length']} tokens, seed {tr['seed']}, the same "
        f"data order for every variant; eval loss over {tr['eval_iters']} held-out batches; "
        f"median step time after {warmup} steps. {env['device']}, {env['torch_threads']} "
        f"threads, torch {env['torch']}, {env['date']}.\n\n"
        "One seed at toy scale: read the loss column as a smoke test of the variants, not as "
        "evidence for or against the paper's results. Step times are only comparable on an "
        "otherwise idle machine; the 1-minute load average at the end of this run was "
        f"{load:.1f} on 2 cores{' (other jobs were running)' if load > 2.5 else ''}.\n\n"
    )
    out.with_suffix(".md").write_text(header + table(rows) + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
