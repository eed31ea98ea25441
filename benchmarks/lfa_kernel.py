"""LFA filter speed: our kernels vs the Yuan 2.0 reference formulation vs a matmul roofline.

Side by side in one run, for each shape, forward and forward+backward:
  (a) ours: `localized_filtering` (the Triton kernels on CUDA; on CPU the GEMM-form reference,
      since the kernels run on CPU only in the slow interpreter),
  (b) the formulation of the Yuan 2.0 release: permute to [b, h, s, 1], Conv2d with padding
      (1, 0) and slicing to the first s rows, twice, permute back with a contiguous copy, residual,
      then a separate RMSNorm,
  (c) two plain torch matmuls with the filter's FLOPs ([M, 2h] x [2h, h/2] and [M, h] x [h, h]):
      the practical roofline.
Prints TFLOP/s (4 M h^2 forward FLOPs, 3x that for forward+backward) and the ratios a/b, a/c.

    python benchmarks/lfa_kernel.py                      # GPU: the issue's shapes; CPU: small
    python benchmarks/lfa_kernel.py --out benchmarks/results/lfa_kernel_h100.json
    TRITON_INTERPRET=1 python benchmarks/lfa_kernel.py --dry-run   # the kernels, interpreted, tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import torch.nn.functional as F

from yuanlfa.ops.lfa import localized_filtering
from yuanlfa.ops.rmsnorm import rms_norm


def yuan_conv2d_form(x, w1, b1, w2, b2, g, eps=1e-6):
    """The released model's computation: Conv2d over [b, h, s, 1] with symmetric padding."""
    s, b, h = x.shape
    inp = x.permute(1, 2, 0).reshape(b, h, s, 1)
    y = F.conv2d(inp, w1, b1, padding=(1, 0))[:, :, :s, :]
    z = F.conv2d(y, w2, b2, padding=(1, 0))[:, :, :s, :]
    z = z.permute(2, 3, 0, 1).contiguous().view(s, b, h)
    return rms_norm(z + x, g, eps)


def _timeit(fn, iters: int, sync) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def bench_shape(
    tokens: int, h: int, dtype, device, iters: int, batch: int, impl: str = "auto"
) -> dict:
    s = tokens // batch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = make(s, batch, h, scale=1.0)
    params = [
        make(h // 2, h, 2, 1, scale=(2 * h) ** -0.5),
        make(h // 2, scale=0.02),
        make(h, h // 2, 2, 1, scale=h**-0.5),
        make(h, scale=0.02),
        make(h, scale=0.1),
    ]
    grad = torch.randn(s, batch, h, generator=gen).to(device, dtype)
    ours = lambda: localized_filtering(x, *params, impl=impl)[0]  # noqa: E731
    yuan = lambda: yuan_conv2d_form(x, *params)  # noqa: E731
    m = tokens
    a1 = torch.randn(m, 2 * h, generator=gen).to(device, dtype).requires_grad_()
    b1 = torch.randn(2 * h, h // 2, generator=gen).to(device, dtype).requires_grad_()
    a2 = torch.randn(m, h, generator=gen).to(device, dtype).requires_grad_()
    b2 = torch.randn(h, h, generator=gen).to(device, dtype).requires_grad_()
    roof = lambda: (a1 @ b1, a2 @ b2)  # noqa: E731

    def fwd_bwd(fn):
        def run():
            out = fn()
            if isinstance(out, tuple):
                torch.autograd.backward(out, [torch.ones_like(o) for o in out])
            else:
                out.backward(grad)

        return run

    with torch.no_grad():
        diff = (ours().float() - yuan().float()).abs().max().item()
    flops_fwd = 4.0 * m * h * h
    row = {"tokens": tokens, "hidden": h, "batch": batch, "max_abs_diff_vs_yuan": diff}
    for mode, wrap, flops in (("fwd", None, flops_fwd), ("fwd_bwd", fwd_bwd, 3 * flops_fwd)):
        times = {}
        for name, fn in (("ours", ours), ("yuan_conv2d", yuan), ("matmul_roofline", roof)):
            if wrap is None:
                with torch.no_grad():
                    times[name] = _timeit(fn, iters, sync)
            else:
                times[name] = _timeit(wrap(fn), iters, sync)
        row[mode] = {
            **{f"{k}_ms": 1e3 * v for k, v in times.items()},
            **{f"{k}_tflops": flops / v / 1e12 for k, v in times.items()},
            "ours_vs_yuan_speedup": times["yuan_conv2d"] / times["ours"],
            "ours_vs_roofline_fraction": times["matmul_roofline"] / times["ours"],
        }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU stand-in: the Triton kernels under TRITON_INTERPRET=1, one tiny shape",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    impl = "auto"
    if args.dry_run:
        shapes, iters, impl = [(128, 64)], args.iters or 1, "triton"
        label = "Triton kernels in the CPU interpreter (dry run: checks the path, not the speed)"
    elif cuda:
        shapes = [(t, h) for h in (2048, 8192) for t in (4096, 8192, 32768)]
        iters = args.iters or 20
        label = "triton kernels"
    else:
        shapes = [(1024, 256), (2048, 512)]
        iters = args.iters or 3
        label = "GEMM-form reference (the Triton kernels need CUDA; CPU runs small shapes only)"
        print(f"no CUDA device: (a) is the {label}")
    results = {
        "benchmark": "lfa_kernel",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "ours": label,
        "rows": [],
    }
    header = (
        f"{'tokens':>7} {'hidden':>6} {'mode':>7} | {'ours':>9} {'yuan':>9} {'roof':>9} ms | "
        f"{'ours':>6} {'yuan':>6} {'roof':>6} TFLOP/s | a/b speedup  a/c of roofline"
    )
    print(header)
    for tokens, h in shapes:
        row = bench_shape(tokens, h, dtype, device, iters, args.batch, impl)
        results["rows"].append(row)
        for mode in ("fwd", "fwd_bwd"):
            r = row[mode]
            print(
                f"{tokens:>7} {h:>6} {mode:>7} | {r['ours_ms']:9.3f} {r['yuan_conv2d_ms']:9.3f} "
                f"{r['matmul_roofline_ms']:9.3f} ms | {r['ours_tflops']:6.2f} "
                f"{r['yuan_conv2d_tflops']:6.2f} {r['matmul_roofline_tflops']:6.2f} TFLOP/s | "
                f"{r['ours_vs_yuan_speedup']:10.2f}x {100 * r['ours_vs_roofline_fraction']:13.0f}%"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
