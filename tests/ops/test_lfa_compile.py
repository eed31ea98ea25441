"""The LFA Triton kernels compile for real GPUs (sm_90 and sm_80), checked without a GPU.

tests/ops/lfa_compile_driver.py runs the real launchers (forward and backward, bf16 and fp32,
plain, with state and document starts, hidden 2048 and 8192, decoding with M = 1, the mixed-dtype
paths) under a fake triton driver and compiles every specialization they produce, every autotune
configuration included, with triton.compile for the target; ptxas and cuobjdump come with the
triton wheel. It runs in a subprocess because this test process interprets the kernels
(TRITON_INTERPRET=1) and the fake driver is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TOOLS = [NVIDIA_BIN / "ptxas", NVIDIA_BIN / "cuobjdump"]
MISSING = [str(t) for t in TOOLS if not os.access(t, os.X_OK)]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"triton's NVIDIA tools are absent ({', '.join(MISSING)})"
)

# Shared memory a block may use (the opt-in maximum): sm_90 227 KB, sm_80 163 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Global loads outside the cp.async pipeline that a bf16 GEMM may keep, once per tile or per
# row: the bias in the epilogue (16 32-bit loads per thread in a 128 x 128 wgmma accumulator
# layout), the document flags, the carried state's rows. The strided weight views that the
# K-major layout replaced cost 32-42 scalar 16-bit loads per thread per k-step.
MAX_SCALAR_LOADS = 20
GEMMS = ("_shifted_gemm_kernel", "_weight_grad_kernel")


ARCHS = (90, 80)


@pytest.fixture(scope="module")
def all_compiled(tmp_path_factory) -> dict[int, dict]:
    """Both targets compiled at once, one subprocess each (the compiles are single-threaded)."""
    out = tmp_path_factory.mktemp("aot")
    # Every config a tuning run may pick is compiled, not only the default first one.
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), YUANLFA_TRITON_AUTOTUNE="1")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "tests.ops.lfa_compile_driver", str(arch), str(out / f"{arch}")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in ARCHS
    }
    results = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
        results[arch] = json.loads((out / f"{arch}").read_text())
    return results


@pytest.fixture(params=ARCHS, ids=lambda a: f"sm_{a}")
def compiled(request, all_compiled) -> tuple[int, dict]:
    return request.param, all_compiled[request.param]


def describe(row: dict) -> str:
    c = row["constexprs"]
    tile = "x".join(c.get(k, "?") for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    what = f"{row['kernel']} {row['dtype']} tile {tile} warps {row['num_warps']}"
    return f"{what} ({row['cases'][0]})"


def test_every_launch_sequence_was_driven(compiled) -> None:
    _, result = compiled
    assert result["drive_errors"] == []
    kernels = {row["kernel"] for row in result["rows"]}
    assert kernels == {*GEMMS, "_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"}
    # Mixed dtypes never reach the kernels: every GEMM's operands are bf16 or fp32 alone.
    assert {row["dtype"] for row in result["rows"] if row["kernel"] in GEMMS} == {"*bf16", "*fp32"}


def test_no_compile_error_no_spill_shared_memory_fits(compiled) -> None:
    arch, result = compiled
    bad = []
    for row in result["rows"]:
        if not row["ok"]:
            bad.append(f"{describe(row)}: {row['error'].strip().splitlines()[-1]}")
        elif row["local"] or row["ld_st_local"]:
            bad.append(f"{describe(row)}: spills ({row['local']} bytes local memory)")
        elif row["shared"] > SMEM_LIMIT[arch]:
            bad.append(f"{describe(row)}: {row['shared']} bytes shared > {SMEM_LIMIT[arch]}")
    assert not bad, "\n".join(bad)


def test_bf16_gemms_use_tensor_cores_and_pipelined_vector_loads(compiled) -> None:
    arch, result = compiled
    rows = [r for r in result["rows"] if r["kernel"] in GEMMS and r["dtype"] == "*bf16"]
    assert rows
    bad = []
    for row in rows:
        if arch == 90 and not row["wgmma"]:
            bad.append(f"{describe(row)}: no wgmma on sm_90")
        if arch == 80 and not row["mma"]:
            bad.append(f"{describe(row)}: no mma.sync on sm_80")
        # Operands through the async copy pipeline (cp.async; TMA on newer triton), or with
        # vector loads where the reduction loop has a single step (M = 1 is specialized)...
        if not (row["cp_async"] or row["tma_load"] or row["ld_global_vector"]):
            bad.append(f"{describe(row)}: no vector or asynchronous operand loads")
        # ... and no operand left to per-element scalar loads.
        if row["ld_global_scalar"] > MAX_SCALAR_LOADS:
            bad.append(f"{describe(row)}: {row['ld_global_scalar']} scalar global loads")
    assert not bad, "\n".join(bad)
