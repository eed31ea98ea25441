"""The compiled Triton LFA kernels on CUDA at realistic sizes (skipped without a GPU).

The reference runs on the GPU in fp64 from exactly the same values (low-precision inputs upcast
exactly), so it is exact to ~1e-15 and independent of torch's TF32 settings (with TF32 on, an
fp32 reference is itself only ~1e-3 accurate). What the tolerances measure is the kernels' error.

tests/conftest.py sets TRITON_INTERPRET=1 unless it is already set; on a GPU machine run
``TRITON_INTERPRET=0 pytest tests/ops/test_lfa_triton_gpu.py`` to test the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import yuanlfa.ops.lfa.triton_kernels as triton_kernels  # noqa: E402
from tests.ops.test_lfa_triton import make_inputs as make_host_inputs  # noqa: E402
from yuanlfa.ops.lfa import LFAState, lfa_reference, localized_filtering  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        triton_kernels.INTERPRET,
        reason="TRITON_INTERPRET=1 interprets the kernels on the host; set TRITON_INTERPRET=0",
    ),
]

EPS = 1e-6
PARAMS = ["conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "norm_weight"]
F64 = torch.float64
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). The kernels round the inputs, y,
# the output, and in backward the GEMM operand dr, dy and dx to bf16, and sum up to K = 2h = 4096
# products of bf16 operands in fp32. A few chained roundings of ~2e-3 each, plus rounding noise
# that grows like sqrt(K) in the sums, give errors of ~1e-2 of the largest value (~7e-3 was
# measured at h = 256 under the CPU interpreter). 3e-2 (outputs) and 5e-2 (gradients, one more
# rounded GEMM deep) leave room for h = 2048 and still fail on any wrong or missing term, which
# changes values by O(1) of their magnitude.
BF16_OUT_REL, BF16_GRAD_REL = 3e-2, 5e-2
# fp32 GEMMs run with input_precision="ieee" (no TF32): errors are ~1e-6; 1e-4 would catch TF32.
FP32_REL = 1e-4


def make_inputs(s: int, b: int, h: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The CPU tests' inputs (drawn on the host for determinism), moved to the GPU."""
    host = make_host_inputs(s, b, h, dtype, seed, requires_grad=False)
    return {k: v.to("cuda").requires_grad_(True) for k, v in host.items()}


def make_state(b: int, h: int, dtype: torch.dtype, seed: int) -> LFAState:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, generator=g, dtype=F64)
    y = torch.randn(b, h // 2, generator=g, dtype=F64)
    return LFAState(*(v.to("cuda", dtype).requires_grad_(True) for v in (x, y)))


def exact_copy(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp64 leaves holding exactly the same values (every bf16/fp32 value is an fp64 value)."""
    return {k: v.detach().to(F64).requires_grad_(True) for k, v in t.items()}


def doc_starts(s: int, b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(s, b, generator=g) < 0.01).to("cuda")


def run(fn, t, state, doc_start, g_out):
    """(out, grads by name) with the cotangent g_out on out and a fixed one on the new state's y."""
    out, new_state = fn(t, state=state, doc_start=doc_start)
    g_y = torch.linspace(-1, 1, new_state.y.numel(), device="cuda", dtype=F64)
    loss = (out.to(F64) * g_out).sum() + (new_state.y.to(F64).flatten() * g_y).sum()
    leaves = dict(t)
    if state is not None:
        leaves.update({"state.x": state.x, "state.y": state.y})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, dict(zip(leaves, grads, strict=True))


def triton(t, **kw):
    return localized_filtering(t["x"], *(t[k] for k in PARAMS), EPS, impl="triton", **kw)


def reference(t, **kw):
    return lfa_reference(t["x"], *(t[k] for k in PARAMS), EPS, **kw)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape, what
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} * max |ref| {scale:.3e}"


def check_against_reference(
    s: int,
    b: int,
    h: int,
    dtype: torch.dtype,
    out_rel: float,
    grad_rel: float,
    with_state: bool = False,
    doc_start: torch.Tensor | None = None,
) -> None:
    t = make_inputs(s, b, h, dtype, seed=s + h)
    state = make_state(b, h, dtype, seed=1) if with_state else None
    g = torch.Generator().manual_seed(2)
    g_out = torch.randn(s, b, h, generator=g, dtype=F64).cuda()
    out, grads = run(triton, t, state, doc_start, g_out)
    assert out.dtype == dtype and all(v.dtype == dtype for v in grads.values())
    exp_state = LFAState(**exact_copy(state._asdict())) if state is not None else None
    exp_out, exp_grads = run(reference, exact_copy(t), exp_state, doc_start, g_out)
    assert_rel_close(out, exp_out, out_rel, "out")
    for name, e in exp_grads.items():
        assert_rel_close(grads[name], e, grad_rel, f"grad {name}")


@pytest.mark.parametrize(
    ("s", "b", "h", "with_state"), [(1024, 2, 2048, False), (4096, 2, 1024, True)]
)
def test_bf16_forward_backward(s: int, b: int, h: int, with_state: bool) -> None:
    check_against_reference(s, b, h, torch.bfloat16, BF16_OUT_REL, BF16_GRAD_REL, with_state)


def test_bf16_doc_start_and_state() -> None:
    s, b, h = 1024, 2, 2048
    doc = doc_starts(s, b, seed=3)
    doc[0, 0] = True  # entry 0 ignores the state, entry 1 continues from it
    doc[0, 1] = False
    check_against_reference(
        s, b, h, torch.bfloat16, BF16_OUT_REL, BF16_GRAD_REL, with_state=True, doc_start=doc
    )


@pytest.mark.parametrize(("s", "b", "h"), [(1024, 2, 2048), (4096, 2, 1024)])
def test_fp32_forward_backward(s: int, b: int, h: int) -> None:
    doc = doc_starts(s, b, seed=4)
    check_against_reference(s, b, h, torch.float32, FP32_REL, FP32_REL, True, doc)


@torch.no_grad()
@pytest.mark.parametrize("with_doc", [False, True])
def test_bf16_decode_equals_full_forward(with_doc: bool) -> None:
    s, b, h, prefill = 64, 2, 2048, 16
    t = make_inputs(s, b, h, torch.bfloat16, seed=5)
    doc = None
    if with_doc:
        doc = doc_starts(s, b, seed=6)
        doc[prefill + 4] = True  # a reset during decoding in every entry

    def doc_at(lo: int, hi: int) -> torch.Tensor | None:
        return doc[lo:hi] if doc is not None else None

    full, _ = triton(t, doc_start=doc)
    exp, exp_state = reference(exact_copy(t), doc_start=doc)
    out, state = triton(dict(t, x=t["x"][:prefill]), doc_start=doc_at(0, prefill))
    steps = [out]
    for i in range(prefill, s):
        out, state = triton(dict(t, x=t["x"][i : i + 1]), state=state, doc_start=doc_at(i, i + 1))
        steps.append(out)
    decoded = torch.cat(steps)
    assert decoded.dtype == torch.bfloat16
    assert_rel_close(decoded, exp, BF16_OUT_REL, "decoded vs reference")
    assert_rel_close(decoded, full.to(F64), BF16_OUT_REL, "decoded vs full forward")
    assert_rel_close(state.y, exp_state.y, BF16_OUT_REL, "final state y")
