"""Compile every Triton LFA kernel specialization for one real NVIDIA target, without a GPU.

Run by tests/ops/test_lfa_compile.py in a subprocess (the test process interprets the kernels):

    TRITON_INTERPRET=0 python -m tests.ops.lfa_compile_driver 90 out.json [--quick]

A fake triton driver stands in for CUDA (target sm_<arch>, device 0, stream 0) and
``JITFunction._do_compile`` is replaced by a recorder, so the real launchers
(``yuanlfa.ops.lfa.autograd.lfa_triton``, forward and backward) run on CPU tensors and hand over
exactly the (signature, constexprs, attributes, options) they would compile on that GPU; nothing
is launched. The autotuner's benchmark calls each configuration once, so every configuration it
may pick is recorded too. Each distinct specialization is then compiled with ``triton.compile``
for the target (ptxas from the triton wheel), and its registers, spills and shared memory are
read from the cubin with cuobjdump, its load instructions from the PTX. One JSON row per
specialization.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def make_fake_driver(arch: int) -> DriverBase:
    target = GPUTarget("cuda", arch, 32)

    class FakeCudaDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            # The autotuner "times" each configuration by calling it once: that records it.
            def bench(kernel_call, quantiles=None, **_):
                kernel_call()
                return [1.0, 1.0, 1.0] if quantiles else 1.0

            return bench

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return FakeCudaDriver()


class Recorder:
    """Stands in for JITFunction._do_compile: keeps each distinct specialization, compiles none."""

    def __init__(self) -> None:
        self.specs: dict[str, dict] = {}
        self.case = ""

    def __call__(self, fn, key, signature, device, constexprs, options, attrs, warmup):
        ident = repr(
            (
                fn.fn.__name__,
                sorted(signature.items()),
                sorted((k, str(v)) for k, v in constexprs.items()),
                sorted((k, str(v)) for k, v in attrs.items()),
                options.num_warps,
                options.num_stages,
            )
        )
        rec = self.specs.setdefault(
            ident,
            {
                "fn": fn,
                "signature": dict(signature),
                "constexprs": dict(constexprs),
                "attrs": dict(attrs),
                "options": dict(options.__dict__),
                "cases": [],
            },
        )
        rec["cases"].append(self.case)
        return None  # JITFunction.run returns without launching


def cases(quick: bool) -> list[dict]:
    """The launch sequences a training or decoding run produces (hidden 2048 and 8192)."""
    out = []
    for h in (2048,) if quick else (2048, 8192):
        for dtype in (torch.bfloat16, torch.float32):
            variants = ((False, False), (True, True))
            if h == 2048:
                variants += ((True, False), (False, True))
            for state, doc in variants:
                out.append(dict(s=1024, b=2, h=h, dtype=dtype, state=state, doc=doc))
            # decoding: one token per entry (M = b), with the carried state, forward only
            out.append(dict(s=1, b=1, h=h, dtype=dtype, state=True, doc=False))
            out.append(dict(s=1, b=2, h=h, dtype=dtype, state=True, doc=True))
    # the trainer's mixed-dtype paths: fp32 parameters under bf16 autocast, and bf16 activations
    # with fp32 parameters without autocast (both must reach the kernels as bf16 only)
    bf16 = torch.bfloat16
    out.append(dict(s=1024, b=2, h=2048, dtype=bf16, state=False, doc=True, mix="autocast"))
    out.append(dict(s=1024, b=2, h=2048, dtype=bf16, state=True, doc=False, mix="params"))
    return out


def drive(case: dict) -> None:
    from yuanlfa.ops.lfa.autograd import lfa_triton

    s, b, h, dtype = case["s"], case["b"], case["h"], case["dtype"]
    mix = case.get("mix")
    pdt = torch.float32 if mix else dtype
    g = torch.Generator().manual_seed(0)

    def t(*shape, dt=pdt):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt).requires_grad_()

    x = t(s, b, h, dt=dtype if mix == "params" else pdt)
    params = (t(h // 2, h, 2, 1), t(h // 2), t(h, h // 2, 2, 1), t(h), t(h))
    prev = (t(b, h), t(b, h // 2)) if case["state"] else (None, None)
    doc = (torch.rand(s, b, generator=g) < 0.01) if case["doc"] else None
    decoding = s == 1  # decoding runs without gradients
    with (
        torch.autocast("cpu", dtype=dtype, enabled=mix == "autocast"),
        torch.no_grad() if decoding else contextlib.nullcontext(),
    ):
        out, y = lfa_triton(x, *params, 1e-6, *prev, doc)
    if not decoding:
        torch.autograd.backward([out, y], [torch.zeros_like(out), torch.zeros_like(y)])


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.remove(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))


def ptx_counts(ptx: str) -> dict:
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ld_global_vector": len(re.findall(r"\bld\.global[^\s;]*\.v[248]", ptx)),
        "ld_global_scalar": len(re.findall(r"\bld\.global(?![^\s;]*\.v[248])[^\s;]*\s", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        "tma_load": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "ld_st_local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
    }


def compile_all(recorder: Recorder, arch: int) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for rec in recorder.specs.values():
        fn = rec["fn"]
        opts = dict(rec["options"])
        for derived in ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes"):
            opts.pop(derived, None)  # re-derived from the target
        opts.pop("max_num_imprecise_acc_default", None)
        names = fn.arg_names
        row = {
            "kernel": fn.fn.__name__,
            "arch": arch,
            "num_warps": opts.get("num_warps"),
            "num_stages": opts.get("num_stages"),
            "dtype": next(
                (rec["signature"][k] for k in ("IN", "GRAD", "R") if k in rec["signature"]), None
            ),
            "constexprs": {names[k[0]]: str(v) for k, v in rec["constexprs"].items()},
            "cases": sorted(set(rec["cases"])),
        }
        src = triton.compiler.ASTSource(
            fn=fn, signature=rec["signature"], constexprs=rec["constexprs"], attrs=rec["attrs"]
        )
        try:
            kernel = triton.compile(src, target=target, options=opts)
            row.update(
                ok=True,
                shared=kernel.metadata.shared,
                **resources(kernel.asm["cubin"]),
                **ptx_counts(kernel.asm["ptx"]),
            )
        except Exception as e:  # noqa: BLE001 - every failure is a row the test reports
            row.update(ok=False, error="".join(traceback.format_exception_only(type(e), e))[-3000:])
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    arch, out_path = int(argv[0]), argv[1]
    triton_driver.set_active(make_fake_driver(arch))
    recorder = Recorder()
    JITFunction._do_compile = lambda self, *a: recorder(self, *a)

    from yuanlfa.ops.lfa import triton_kernels

    assert not triton_kernels.INTERPRET, "TRITON_INTERPRET must be 0 for the GPU tiles"
    drive_errors = []
    for case in cases("--quick" in argv):
        recorder.case = ", ".join(f"{k}={v}" for k, v in case.items())
        try:
            drive(case)
        except Exception as e:  # noqa: BLE001
            drive_errors.append(f"{recorder.case}: {e!r}")
    rows = compile_all(recorder, arch)
    with open(out_path, "w") as f:
        json.dump({"drive_errors": drive_errors, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
