"""LFA filter: our GEMM-form reference vs the released Conv2d form, side by side in one run.

The Conv2d form is how the Yuan 2.0 release computes the filter: permute to [b, h, s, 1], pad one
zero row in front, conv2d, pad again, conv2d, permute back. Ours computes each convolution as a
GEMM over [x_{t-1} | x_t] without padded copies. Prints forward and forward+backward times and the
ratio (>1 means ours is faster).

    python benchmarks/bench_lfa_reference.py --seq 1024 --batch 2 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from yuanlfa.ops.lfa import lfa_reference
from yuanlfa.ops.rmsnorm import rms_norm


def conv2d_form(x, w1, b1, w2, b2, g, eps=1e-6):
    s, b, h = x.shape
    inp = x.permute(1, 2, 0).unsqueeze(-1)  # [b, h, s, 1]
    y = F.conv2d(F.pad(inp, (0, 0, 1, 0)), w1, b1)
    z = F.conv2d(F.pad(y, (0, 0, 1, 0)), w2, b2)
    z = z.squeeze(-1).permute(2, 0, 1)
    return rms_norm(z + x, g, eps)


def _time(fn, iters: int, sync) -> float:
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h = args.hidden
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=gen) * 0.05).to(device, dtype)
    x = make(args.seq, args.batch, h).requires_grad_()
    params = [make(h // 2, h, 2, 1), make(h // 2), make(h, h // 2, 2, 1), make(h), make(h) + 1]
    for p in params:
        p.requires_grad_()
    ours = lambda: lfa_reference(x, *params)[0]
    released = lambda: conv2d_form(x, *params)
    diff = (ours().float() - released().float()).abs().max().item()
    grad = torch.randn_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), [x, *params], grad)

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "shape": {"seq": args.seq, "batch": args.batch, "hidden": h, "dtype": args.dtype},
        "max_abs_diff": diff,
    }
    with torch.no_grad():
        results["forward_ms"] = {
            "ours": 1e3 * _time(ours, args.iters, sync),
            "conv2d": 1e3 * _time(released, args.iters, sync),
        }
    results["fwd_bwd_ms"] = {
        "ours": 1e3 * _time(fwd_bwd(ours), args.iters, sync),
        "conv2d": 1e3 * _time(fwd_bwd(released), args.iters, sync),
    }
    for key in ("forward_ms", "fwd_bwd_ms"):
        r = results[key]
        r["speedup"] = r["conv2d"] / r["ours"]
        print(
            f"{key:11s} ours {r['ours']:8.2f} ms   conv2d form {r['conv2d']:8.2f} ms   "
            f"ratio {r['speedup']:.2f}x"
        )
    print(f"max |ours - conv2d| = {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
