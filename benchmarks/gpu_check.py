"""The one-shot GPU check: GPU tests, the LFA kernel benchmark and a 1-GPU 2B training run.

Meant for one bare H100/H200 machine without network (torch and triton preinstalled), in at most
8 minutes; run through benchmarks/gpu_check.sh. Stages, each in its own subprocess with its own
time limit (a failed or timed-out stage is recorded and the next one still runs):

  1. tests: ``pytest -m gpu`` with compiled kernels (TRITON_INTERPRET=0); the kernels compiled
     and autotuned here land in triton's cache, which the later stages reuse;
  2. lfa_kernel: benchmarks/lfa_kernel.py (ours vs Yuan's Conv2d form vs an equal-FLOP cuBLAS
     matmul, bf16, hidden 2048 and 8192);
  3. train_triton / train_reference: ``python -m yuanlfa.cli.train --config
     configs/yuan2-2b.yaml`` at the 2B shape (seq 8192, bf16 parameters, micro-batch 1) for a
     few steps, with ``model.lfa_impl=triton`` and ``=reference``; tokens/s and peak memory from
     the steps after the first (the first compiles and autotunes).

Writes benchmarks/results/gpu_<device>_<date>.json. ``--dry-run`` runs every stage's CPU stand-in
(the kernels in the interpreter, tiny shapes, a tiny model on CPU) and writes the JSON too, so the
script is known to work before a GPU is ever lent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import package_version  # noqa: E402

# Seconds per stage on the GPU; together under the 8 minutes the check may take.
GPU_LIMITS = {"tests": 140, "lfa_kernel": 90, "train_triton": 150, "train_reference": 100}
DRY_LIMITS = {"tests": 600, "lfa_kernel": 300, "train_triton": 600, "train_reference": 300}


def run_stage(name: str, cmd: list[str], env: dict, limit: int, log_dir: Path) -> dict:
    """Run one stage; its output goes to log_dir/<name>.log, its summary comes back."""
    log = log_dir / f"{name}.log"
    start = time.perf_counter()
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit
            )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[gpu_check] {name}: rc={rc} in {seconds}s", flush=True)
    return {"rc": rc, "ok": rc == 0, "seconds": seconds, "limit_s": limit, "log_tail": tail}


def pytest_summary(tail: list[str]) -> dict:
    """Counts from pytest's last line ('3 passed, 2 skipped in 4.1s')."""
    counts = {}
    for line in reversed(tail):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line)
        if found:
            counts = {kind: int(n) for n, kind in found}
            break
    return counts


def train_command(impl: str, dry: bool, layers: int, steps: int, out: Path) -> list[str]:
    sets = [
        f"model.lfa_impl={impl}",
        f"train.steps={steps}",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "checkpoint.save_at_end=false",
        "checkpoint.dir=null",  # the preset resumes from its own directory; a check saves nothing
        "checkpoint.resume=false",
        "checkpoint.interval=0",
        "data.num_workers=0",
        f"logging.jsonl={out}",
        f"model.num_layers={layers}",
    ]
    if dry:
        # A tiny model of the same form on CPU; the kernels run in the interpreter.
        sets += [
            "model.hidden_size=64",
            "model.num_heads=4",
            "model.vocab_size=384",
            "data.tokenizer=byte",  # the stand-in's vocabulary; the GPU run uses Yuan's
            "train.seq_length=64",
            "train.device=cpu",
            "train.precision=fp32",
            "train.param_dtype=fp32",
        ]
    cmd = [sys.executable, "-m", "yuanlfa.cli.train", "--config", "configs/yuan2-2b.yaml"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + ["--quiet"]


def train_summary(jsonl: Path) -> dict:
    """tokens/s and memory over the steps after the first (compilation, autotuning)."""
    if not jsonl.exists():
        return {}
    steps = []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        if "tokens_per_s" in rec:
            steps.append(rec)
    timed = steps[1:] or steps
    if not timed:
        return {}
    summary = {
        "steps_logged": len(steps),
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "first_step_tokens_per_s": steps[0]["tokens_per_s"],
        "mem_gb": max(r.get("mem_gb") or 0.0 for r in steps),
        "final_loss": steps[-1].get("loss"),
    }
    mfu = [r["mfu"] for r in timed if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        summary["mfu"] = sum(mfu) / len(mfu)
    return summary


def device_name(dry: bool) -> str:
    if dry:
        return "cpu-dry-run"
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage's CPU stand-in")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--layers", type=int, default=None, help="layers of the 2B run (24)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (6)")
    parser.add_argument("--skip", action="append", default=[], help="a stage to leave out")
    args = parser.parse_args(argv)
    dry = args.dry_run
    limits = DRY_LIMITS if dry else GPU_LIMITS
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base_env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4")
    )
    gpu_env = dict(base_env, TRITON_INTERPRET="0")
    cpu_env = dict(base_env, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env = cpu_env if dry else gpu_env
    py = sys.executable

    stages: dict[str, dict] = {}
    if "tests" not in args.skip:
        if dry:
            # The interpreter runs the same checks the GPU tests make, on small shapes.
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/ops/test_lfa_triton.py", "-k", "decode_equals_full_forward"]  # fmt: skip
        else:
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/"]
        stages["tests"] = run_stage("tests", cmd, env, limits["tests"], work)
        stages["tests"]["counts"] = pytest_summary(stages["tests"]["log_tail"])
    if "lfa_kernel" not in args.skip:
        bench_json = work / "lfa_kernel.json"
        cmd = [py, "benchmarks/lfa_kernel.py", "--out", str(bench_json)]
        cmd += ["--dry-run"] if dry else ["--dtype", "bfloat16", "--iters", "10"]
        stages["lfa_kernel"] = run_stage("lfa_kernel", cmd, env, limits["lfa_kernel"], work)
        if bench_json.exists():
            stages["lfa_kernel"]["results"] = json.loads(bench_json.read_text())
    layers = args.layers or (1 if dry else 24)
    steps = args.steps or (2 if dry else 6)
    for impl in ("triton", "reference"):
        name = f"train_{impl}"
        if name in args.skip:
            continue
        jsonl = work / f"{name}.jsonl"
        cmd = train_command(impl, dry, layers, steps, jsonl)
        stages[name] = run_stage(name, cmd, env, limits[name], work)
        stages[name]["summary"] = train_summary(jsonl)
        stages[name]["shape"] = {"layers": layers, "steps": steps}

    import torch

    result = {
        "check": "gpu_check",
        "dry_run": dry,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dry),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "flash_attn": package_version("flash-attn") or package_version("flash_attn"),
        "ok": all(s["ok"] for s in stages.values()),
        "stages": stages,
    }
    tri = stages.get("train_triton", {}).get("summary", {})
    ref = stages.get("train_reference", {}).get("summary", {})
    if tri.get("tokens_per_s") and ref.get("tokens_per_s"):
        result["train_triton_vs_reference_speedup"] = tri["tokens_per_s"] / ref["tokens_per_s"]
    date = datetime.date.today().isoformat()
    path = out_dir / f"gpu_{result['device']}_{date}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"[gpu_check] {'all stages passed' if result['ok'] else 'SOME STAGES FAILED'}; wrote {path}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
