"""Peak memory of the LM head + loss: the plain full-logits head vs the block-wise one.

Forward + backward (gradients of hidden and of the output embedding) at Yuan 2.0's vocabulary,
side by side in one run. Each variant runs in a fresh subprocess so that one cannot inherit the
other's high-water mark or allocator cache:
  - CUDA: torch.cuda.max_memory_allocated() minus the memory allocated after the inputs are
    created (bytes held by live tensors: logits, saved activations, gradients, temporaries);
  - CPU: the process's resident-set high-water mark (VmHWM) minus its resident set size, with
    the mark reset (/proc/self/clear_refs) after the inputs are created and a one-token warm-up
    ran, so that imports, thread pools and temporaries of input creation are not counted. Where
    the mark cannot be reset, the rise of getrusage's ru_maxrss is used, which undercounts when
    an earlier transient was higher (the output says which).
Both count the gradients of hidden and weight, which are the same size for both variants.
Timing (median of --iters forward + backward) is taken after the memory measurement.

    python benchmarks/loss_memory.py                  # GPU: h 2048, 8192 tokens; CPU: 256, 2048
    python benchmarks/loss_memory.py --out benchmarks/results/loss_memory_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _env import cpu_name  # benchmarks/ is on sys.path when a script runs

from yuanlfa.ops.cross_entropy import blockwise_lm_loss, plain_lm_loss

YUAN_VOCAB = 135040
MIB = 2**20


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak() -> tuple[int, bool]:
    """(baseline bytes, whether the high-water mark was reset to the current RSS)."""
    try:
        # "5" resets the peak resident set size (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmRSS"), True
    except OSError:
        # Linux reports ru_maxrss in KiB.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False


def _rss_peak(reset: bool) -> int:
    if reset:
        return _proc_status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this (fresh) process: peak extra memory and time of forward + backward."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    s, b = args.tokens // args.batch, args.batch
    hidden = torch.randn(s, b, args.hidden, device=device, dtype=dtype).requires_grad_()
    weight = (
        torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02
    ).requires_grad_()
    labels = torch.randint(0, args.vocab, (s, b), device=device)
    if args.variant == "plain":
        loss_fn = plain_lm_loss
    else:
        loss_fn = lambda x, w, y: blockwise_lm_loss(x, w, y, block_size=args.block_size)  # noqa: E731

    def step() -> None:
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).mean().backward()

    # A tiny warm-up on a few tokens loads kernels and thread pools before the baseline.
    small = slice(0, 1)
    loss_fn(hidden[small].detach(), weight.detach(), labels[small]).sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        reset = True
        sync = torch.cuda.synchronize
    else:
        base, reset = _reset_rss_peak()
        step()
        peak = _rss_peak(reset) - base
        sync = lambda: None  # noqa: E731
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "time_s": statistics.median(times), "peak_reset": reset}


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--tokens",
        str(args.tokens),
        "--batch",
        str(args.batch),
        "--block-size",
        str(args.block_size),
        "--iters",
        str(args.iters),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _what_was_measured(gpu: bool, reset: bool) -> str:
    if gpu:
        return "torch.cuda.max_memory_allocated above the inputs, one fresh process per variant"
    if reset:
        return (
            "RSS high-water mark (VmHWM, reset after the inputs) minus the RSS at the reset, "
            "one fresh process per variant"
        )
    return (
        "rise of ru_maxrss over its value after the inputs (the mark could not be reset: a lower "
        "bound), one fresh process per variant"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--vocab", type=int, default=YUAN_VOCAB)
    p.add_argument("--hidden", type=int, default=None, help="default: 2048 GPU, 256 CPU")
    p.add_argument("--tokens", type=int, default=None, help="s*b; default: 8192 GPU, 2048 CPU")
    p.add_argument("--batch", type=int, default=1, help="b; s = tokens // b")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", choices=["plain", "blockwise"], help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.hidden = args.hidden or (2048 if gpu else 256)
    args.tokens = args.tokens or (8192 if gpu else 2048)
    if args.tokens % args.batch:
        p.error(f"--tokens {args.tokens} is not divisible by --batch {args.batch}")

    if args.child:
        args.variant = args.child
        print(json.dumps(measure(args)))
        return

    results = {v: run_variant(args, v) for v in ("plain", "blockwise")}
    ratio = results["plain"]["peak_bytes"] / max(results["blockwise"]["peak_bytes"], 1)
    measured = _what_was_measured(gpu, all(r["peak_reset"] for r in results.values()))
    device_name = torch.cuda.get_device_name(args.device) if gpu else cpu_name()
    print(
        f"LM head + loss, forward + backward: vocab {args.vocab}, hidden {args.hidden}, "
        f"{args.tokens} tokens, {args.dtype}, block {args.block_size}, on {args.device} "
        f"({device_name}, {torch.get_num_threads()} threads)"
    )
    print(f"measured: {measured}")
    for v, r in results.items():
        print(f"  {v:>9}: peak {r['peak_bytes'] / MIB:9.1f} MiB   time {r['time_s'] * 1e3:9.1f} ms")
    print(f"  plain / blockwise peak: {ratio:.2f}x")
    weight_bytes = args.vocab * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(
        f"  (for scale: fp32 logits {args.tokens * args.vocab * 4 / MIB:.1f} MiB, "
        f"weight {weight_bytes / MIB:.1f} MiB)"
    )
    if args.out:
        record = {
            "benchmark": "loss_memory",
            "device": args.device,
            "device_name": device_name,
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "measured": measured,
            "shapes": {
                "vocab": args.vocab,
                "hidden": args.hidden,
                "tokens": args.tokens,
                "batch": args.batch,
                "block_size": args.block_size,
            },
            "dtype": args.dtype,
            "iters": args.iters,
            "plain": results["plain"],
            "blockwise": results["blockwise"],
            "peak_ratio_plain_over_blockwise": ratio,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
