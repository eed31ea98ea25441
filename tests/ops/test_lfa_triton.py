"""The Triton LFA kernels (run by Triton's CPU interpreter) against the plain-torch reference.

conftest.py sets TRITON_INTERPRET=1 before the kernels are imported. The interpreter computes
fp32 and fp64 dots exactly as written (no TF32), so the fp64 comparisons are at rounding level
and fp32 at ~1e-5 of the largest value. Every comparison is with an independent computation: the
reference (plain torch, its own autograd), separate runs per document or per shard, finite
differences.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

import yuanlfa.ops.lfa.autograd as lfa_autograd  # noqa: E402
import yuanlfa.ops.lfa.triton_kernels as triton_kernels  # noqa: E402
from yuanlfa.ops.lfa import (  # noqa: E402
    LFAState,
    halo_state,
    lfa_reference,
    localized_filtering,
    resolve_impl,
)

# These tests interpret the kernels on the host; with TRITON_INTERPRET=0 (a GPU run of the suite,
# `pytest -m gpu`) tests/ops/test_lfa_triton_gpu.py covers the compiled kernels instead.
pytestmark = pytest.mark.skipif(
    not triton_kernels.INTERPRET, reason="needs TRITON_INTERPRET=1 (the CPU interpreter)"
)

EPS = 1e-6
PARAMS = ["conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "norm_weight"]
F64, F32 = torch.float64, torch.float32
DTYPE_ID = lambda d: str(d).removeprefix("torch.")  # noqa: E731
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
# Allowed max |error| as a fraction of the reference's max |value| (fp32: a few ulps summed over
# K <= 2 * 256 products; low precision: measured ~7e-3 for bf16 and ~6e-4 for fp16, 3x margin).
REL = {F32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_inputs(
    s: int, b: int, h: int, dtype: torch.dtype = F64, seed: int = 0, requires_grad: bool = True
) -> dict[str, torch.Tensor]:
    """Input and parameters scaled like real ones (weights randn / sqrt(fan_in)): values O(1).

    Drawn in fp64 and then cast, so that every dtype sees the same values up to rounding.
    """
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(s, b, h, generator=g, dtype=F64),
        # Conv fan-in is in_channels * kernel (2).
        "conv1_weight": torch.randn(h // 2, h, 2, 1, generator=g, dtype=F64) / (2 * h) ** 0.5,
        "conv1_bias": 0.5 * torch.randn(h // 2, generator=g, dtype=F64),
        "conv2_weight": torch.randn(h, h // 2, 2, 1, generator=g, dtype=F64) / h**0.5,
        "conv2_bias": 0.5 * torch.randn(h, generator=g, dtype=F64),
        "norm_weight": 1.0 + 0.5 * torch.randn(h, generator=g, dtype=F64),
    }
    return {k: v.to(dtype).requires_grad_(requires_grad) for k, v in t.items()}


def make_state(
    b: int, h: int, dtype: torch.dtype = F64, seed: int = 1, requires_grad: bool = True
) -> LFAState:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, generator=g, dtype=F64).to(dtype).requires_grad_(requires_grad)
    y = torch.randn(b, h // 2, generator=g, dtype=F64).to(dtype).requires_grad_(requires_grad)
    return LFAState(x, y)


def packed_doc_start(s: int, starts_per_row: list[list[int]]) -> torch.Tensor:
    doc = torch.zeros(s, len(starts_per_row), dtype=torch.bool)
    for j, starts in enumerate(starts_per_row):
        doc[starts, j] = True
    return doc


def triton(t: dict[str, torch.Tensor], **kw) -> tuple[torch.Tensor, LFAState]:
    return localized_filtering(t["x"], *(t[k] for k in PARAMS), EPS, impl="triton", **kw)


def reference(t: dict[str, torch.Tensor], **kw) -> tuple[torch.Tensor, LFAState]:
    return lfa_reference(t["x"], *(t[k] for k in PARAMS), EPS, **kw)


def upcast(t: dict[str, torch.Tensor], dtype: torch.dtype = F32) -> dict[str, torch.Tensor]:
    """Fresh leaves holding the same values in a wider dtype."""
    return {k: v.detach().to(dtype).requires_grad_(True) for k, v in t.items()}


def cotangents(s: int, b: int, h: int, seed: int = 99) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(s, b, h, generator=g, dtype=F64),
        torch.randn(b, h, generator=g, dtype=F64),
        torch.randn(b, h // 2, generator=g, dtype=F64),
    )


def forward_backward(
    fn, t: dict[str, torch.Tensor], state: LFAState | None, doc_start: torch.Tensor | None
) -> tuple[torch.Tensor, LFAState, dict[str, torch.Tensor]]:
    """Run fn and backpropagate fixed random cotangents through out AND the returned state.

    The returned state counts: chunked training and sequence parallelism backpropagate through
    it, and its y is a second output of the Triton function with its own gradient path.
    """
    out, new_state = fn(t, state=state, doc_start=doc_start)
    s, b, h = out.shape
    g_out, g_x, g_y = cotangents(s, b, h)
    loss = (
        (out.to(F64) * g_out).sum()
        + (new_state.x.to(F64) * g_x).sum()
        + (new_state.y.to(F64) * g_y).sum()
    )
    leaves = dict(t)
    if state is not None:
        leaves.update({"state.x": state.x, "state.y": state.y})
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, new_state, dict(zip(leaves, grads, strict=True))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected| (computed in fp64)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} * max |ref| {scale:.3e}"


def assert_all_close(
    got: tuple[torch.Tensor, LFAState, dict[str, torch.Tensor]],
    exp: tuple[torch.Tensor, LFAState, dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    (out, state, grads), (e_out, e_state, e_grads) = got, exp
    pairs = [("out", out, e_out), ("state.x", state.x, e_state.x), ("state.y", state.y, e_state.y)]
    assert grads.keys() == e_grads.keys()
    pairs += [(f"grad {k}", grads[k], e_grads[k]) for k in grads]
    for what, a, e in pairs:
        if dtype == F64:
            torch.testing.assert_close(a, e, **TOL64, msg=lambda m, w=what: f"{w}: {m}")
        else:
            assert_rel_close(a, e, REL[dtype], what)


# Every value of every axis appears: s in {1, 2, 63, 257}, b in {1, 3}, h in {48, 96, 256},
# with and without an incoming state, in both dtypes; (257, 3, 256) in fp32.
CASES = [
    (F64, 1, 1, 48, True),
    (F64, 2, 3, 96, False),
    (F64, 63, 3, 48, True),
    (F64, 63, 1, 256, False),
    (F64, 257, 1, 96, True),
    (F32, 1, 3, 256, False),
    (F32, 2, 1, 48, True),
    (F32, 63, 3, 96, True),
    (F32, 257, 3, 256, True),
    (F32, 257, 1, 48, False),
]


def case_id(case: tuple) -> str:
    dtype, s, b, h, with_state = case
    return f"{DTYPE_ID(dtype)}-s{s}-b{b}-h{h}" + ("-state" if with_state else "")


@pytest.mark.parametrize(("dtype", "s", "b", "h", "with_state"), CASES, ids=map(case_id, CASES))
def test_outputs_and_all_gradients_match_reference(
    dtype: torch.dtype, s: int, b: int, h: int, with_state: bool
) -> None:
    t = make_inputs(s, b, h, dtype, seed=s * 7 + b * 3 + h)
    state = make_state(b, h, dtype, seed=5) if with_state else None
    got = forward_backward(triton, t, state, None)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2].values())
    assert_all_close(got, forward_backward(reference, t, state, None), dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=DTYPE_ID)
def test_gradients_with_doc_start_and_state_match_reference(dtype: torch.dtype) -> None:
    s, b, h = 40, 3, 96
    t = make_inputs(s, b, h, dtype, seed=61)
    state = make_state(b, h, dtype, seed=62)
    # Starts at the first token, in the middle, on adjacent tokens and at the last token.
    doc = packed_doc_start(s, [[0, 9, 10, 39], [5, 20], [1, 2, 3, 30]])
    got = forward_backward(triton, t, state, doc)
    assert_all_close(got, forward_backward(reference, t, state, doc), dtype)


def test_eps_is_used() -> None:
    # A large eps changes the result visibly; the kernels must use the given one.
    t = make_inputs(7, 2, 48, F64, seed=63)
    eps = 0.5
    got = localized_filtering(t["x"], *(t[k] for k in PARAMS), eps, impl="triton")[0]
    exp = lfa_reference(t["x"], *(t[k] for k in PARAMS), eps)[0]
    torch.testing.assert_close(got, exp, **TOL64)
    assert (got - reference(t)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("splits", [[1], [1, 2, 30], [20, 21, 62]])
def test_chunks_with_returned_state_equal_one_pass(splits: list[int]) -> None:
    # Training on chunks: each chunk continues from the state the previous one returned, and the
    # gradient crosses chunk boundaries through it (state.y is the kernels' second output).
    s, b, h = 63, 3, 48
    t = make_inputs(s, b, h, F64, seed=64)
    doc = packed_doc_start(s, [[0, 21], [2], []])
    full, full_state = reference(t, doc_start=doc)
    outs, state = [], None
    for lo, hi in itertools.pairwise([0, *splits, s]):
        out, state = triton(dict(t, x=t["x"][lo:hi]), state=state, doc_start=doc[lo:hi])
        outs.append(out)
    chunked = torch.cat(outs)
    torch.testing.assert_close(chunked, full, **TOL64)
    torch.testing.assert_close(state.y, full_state.y, **TOL64)
    g_out, _, g_y = cotangents(s, b, h)
    leaves = list(t.values())
    exp = torch.autograd.grad((full * g_out).sum() + (full_state.y * g_y).sum(), leaves)
    got = torch.autograd.grad((chunked * g_out).sum() + (state.y * g_y).sum(), leaves)
    for name, a, e in zip(t, got, exp, strict=True):
        torch.testing.assert_close(a, e, **TOL64, msg=lambda m, n=name: f"grad {n}: {m}")


def strided(v: torch.Tensor, dim: int) -> torch.Tensor:
    """The same values in non-dense memory: every other element along dim is skipped."""
    shape = list(v.shape)
    shape[dim] *= 2
    index = [slice(None)] * v.dim()
    index[dim] = slice(None, None, 2)
    big = torch.zeros(shape, dtype=v.dtype)
    big[tuple(index)] = v
    return big[tuple(index)]


def transposed(v: torch.Tensor) -> torch.Tensor:
    """The same values with the first two dimensions swapped in memory."""
    return v.transpose(0, 1).contiguous().transpose(0, 1)


def test_non_contiguous_inputs_match_reference() -> None:
    s, b, h = 9, 3, 48
    t = make_inputs(s, b, h, F64, seed=65, requires_grad=False)
    state = make_state(b, h, F64, seed=66, requires_grad=False)
    odd = {
        "x": transposed(t["x"]),  # batch-major memory, as after a [b, s, h] -> [s, b, h] view
        "conv1_weight": transposed(t["conv1_weight"]),
        "conv1_bias": strided(t["conv1_bias"], 0),
        "conv2_weight": strided(t["conv2_weight"], 2),
        "conv2_bias": t["conv2_bias"],
        "norm_weight": strided(t["norm_weight"], 0),
    }
    odd_state = LFAState(transposed(state.x), strided(state.y, 1))
    assert not any(v.is_contiguous() for k, v in odd.items() if k != "conv2_bias")
    assert not any(v.is_contiguous() for v in odd_state)
    odd = {k: v.requires_grad_(True) for k, v in odd.items()}
    odd_state = LFAState(*(v.requires_grad_(True) for v in odd_state))
    doc = packed_doc_start(s, [[0, 4], [8], []])
    got = forward_backward(triton, odd, odd_state, doc)
    exp_state = LFAState(*(v.clone().requires_grad_(True) for v in state))
    exp = forward_backward(reference, upcast(t, F64), exp_state, doc)
    assert_all_close(got, exp, F64)


def test_gradcheck_with_state_and_doc_start() -> None:
    # Small: on a mismatch gradcheck recomputes full Jacobians for its message (~100 s here).
    # h/2 = 8 < the smallest block (16) exercises the masked K lanes.
    s, b, h = 5, 2, 16
    t = make_inputs(s, b, h, F64, seed=71)
    state = make_state(b, h, F64, seed=72)
    # Row 0 restarts at its first token (the state must not reach it) and at token 3.
    doc = packed_doc_start(s, [[0, 3], [2]])

    def fn(x, w1, b1, w2, b2, nw, sx, sy):
        out, st = localized_filtering(
            x, w1, b1, w2, b2, nw, EPS, state=LFAState(sx, sy), doc_start=doc, impl="triton"
        )
        return out, st.y

    inputs = (*t.values(), *state)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def shards_of(s: int, n: int) -> list[tuple[int, int]]:
    bounds = [s * i // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def run_shard(
    t: dict[str, torch.Tensor],
    x_local: torch.Tensor,
    halo: torch.Tensor | None,
    doc_local: torch.Tensor | None,
    halo_doc: torch.Tensor | None,
) -> torch.Tensor:
    """One sequence-parallel rank: its own tokens, plus the previous rank's last two inputs."""
    state = None
    if halo is not None:
        state = halo_state(halo, t["conv1_weight"], t["conv1_bias"], halo_doc)
    out, _ = triton(dict(t, x=x_local), state=state, doc_start=doc_local)
    return out


# Starts placed on shard boundaries (the shard's first token: state ignored) and on the halo's
# last token (halo_doc_start) for both the 2- and the 4-way split of 64 tokens.
HALO_DOCS = [None, [[0, 15, 31, 40], [0, 16, 32, 47]]]


@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("starts", HALO_DOCS, ids=["no-docs", "docs"])
def test_halo_shards_equal_full_sequence(n_shards: int, starts: list[list[int]] | None) -> None:
    s, b, h = 64, 2, 96
    t = make_inputs(s, b, h, F64, seed=81)
    doc = packed_doc_start(s, starts) if starts is not None else None
    g_out = cotangents(s, b, h)[0]
    full, _ = triton(t, doc_start=doc)
    torch.testing.assert_close(full, reference(t, doc_start=doc)[0], **TOL64)
    leaves = list(t.values())
    full_grads = torch.autograd.grad((full * g_out).sum(), leaves)
    x_full = t["x"]
    parts = shards_of(s, n_shards)

    def doc_args(lo: int, hi: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if doc is None:
            return None, None
        return doc[lo:hi], (doc[lo - 1] if lo > 0 else None)

    # (a) Every shard's x and halo are slices of one leaf: autograd routes the halo gradient.
    outs = []
    for lo, hi in parts:
        doc_local, halo_doc = doc_args(lo, hi)
        halo = x_full[lo - 2 : lo] if lo > 0 else None
        outs.append(run_shard(t, x_full[lo:hi], halo, doc_local, halo_doc))
    sharded = torch.cat(outs)
    torch.testing.assert_close(sharded, full, **TOL64)
    shard_grads = torch.autograd.grad((sharded * g_out).sum(), leaves)
    for name, a, e in zip(t, shard_grads, full_grads, strict=True):
        torch.testing.assert_close(a, e, **TOL64, msg=lambda m, n=name: f"grad {n}: {m}")

    # (b) Separate leaves per rank, as after a point-to-point exchange: the local gradients plus
    # each halo's gradient sent back to the previous rank add up to the full gradient.
    locals_, halos = [], []
    for lo, hi in parts:
        doc_local, halo_doc = doc_args(lo, hi)
        x_local = x_full[lo:hi].detach().clone().requires_grad_(True)
        halo = x_full[lo - 2 : lo].detach().clone().requires_grad_(True) if lo > 0 else None
        out = run_shard(t, x_local, halo, doc_local, halo_doc)
        (out * g_out[lo:hi]).sum().backward()
        locals_.append(x_local)
        halos.append(halo)
    dx_full = full_grads[0]
    assembled = torch.zeros_like(dx_full)
    for (lo, hi), x_local, halo in zip(parts, locals_, halos, strict=True):
        assembled[lo:hi] += x_local.grad
        if halo is not None:
            assert halo.grad.abs().max() > 1e-3, "the halo gets no gradient"
            assembled[lo - 2 : lo] += halo.grad
    torch.testing.assert_close(assembled, dx_full, **TOL64)
    for i, ((lo, _), halo) in enumerate(zip(parts, halos, strict=True)):
        if halo is not None:
            # The previous rank's last two tokens: their full gradient is what that rank
            # computed locally plus what this rank sends back.
            expected_halo = dx_full[lo - 2 : lo] - locals_[i - 1].grad[-2:]
            torch.testing.assert_close(halo.grad, expected_halo, **TOL64)
    # The shared parameters accumulated every rank's share (before any data-parallel reduce).
    for name, e in zip(t, full_grads, strict=True):
        if name != "x":
            torch.testing.assert_close(t[name].grad, e, **TOL64, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("prefill", [1, 5])
@pytest.mark.parametrize("with_doc", [False, True])
def test_decode_equals_full_forward(prefill: int, with_doc: bool) -> None:
    s, b, h = 13, 2, 48
    t = make_inputs(s, b, h, F64, seed=91, requires_grad=False)
    doc = packed_doc_start(s, [[0, 3, 7], [0, 5, 6, 12]]) if with_doc else None
    full, full_state = triton(t, doc_start=doc)
    ref, ref_state = reference(t, doc_start=doc)
    torch.testing.assert_close(full, ref, **TOL64)

    def doc_at(lo: int, hi: int) -> torch.Tensor | None:
        return doc[lo:hi] if doc is not None else None

    out, state = triton(dict(t, x=t["x"][:prefill]), doc_start=doc_at(0, prefill))
    steps = [out]
    for i in range(prefill, s):
        out, state = triton(dict(t, x=t["x"][i : i + 1]), state=state, doc_start=doc_at(i, i + 1))
        assert out.shape == (1, b, h)
        steps.append(out)
    decoded = torch.cat(steps)
    torch.testing.assert_close(decoded, full, **TOL64)
    torch.testing.assert_close(decoded, ref, **TOL64)
    torch.testing.assert_close(state.x, ref_state.x, **TOL64)
    torch.testing.assert_close(state.y, ref_state.y, **TOL64)
    torch.testing.assert_close(full_state.y, ref_state.y, **TOL64)


@pytest.mark.parametrize(
    "starts_per_row",
    [
        [[0, 5, 6, 40]],
        [[0, 20], [0], [0, 1, 2, 62]],
        # A row whose first token continues an earlier document (no start at 0).
        [[10, 11], [0, 31], [62]],
    ],
)
def test_doc_start_equals_separate_documents(starts_per_row: list[list[int]]) -> None:
    s, h = 63, 48
    b = len(starts_per_row)
    t = make_inputs(s, b, h, F64, seed=101, requires_grad=False)
    doc = packed_doc_start(s, starts_per_row)
    out, state = triton(t, doc_start=doc)
    no_reset, _ = triton(t)
    for j, starts in enumerate(starts_per_row):
        bounds = sorted({0, *starts, s})
        for lo, hi in itertools.pairwise(bounds):
            exp, exp_state = reference(dict(t, x=t["x"][lo:hi, j : j + 1]))
            torch.testing.assert_close(out[lo:hi, j : j + 1], exp, **TOL64)
        torch.testing.assert_close(state.y[j : j + 1], exp_state.y, **TOL64)
        first_reset = min((i for i in starts if i > 0), default=None)
        if first_reset is not None:
            # The reset changes something (the test would notice a kernel ignoring doc_start).
            assert (out[first_reset, j] - no_reset[first_reset, j]).abs().max() > 1e-3


def test_state_with_doc_start_at_first_token() -> None:
    s, b, h = 9, 4, 48
    t = make_inputs(s, b, h, F64, seed=111)
    state = make_state(b, h, F64, seed=112)
    # Entries 0 and 2 start a document at their first token (the state must be ignored there);
    # entries 1 and 3 continue from the state. Later starts in some rows too.
    doc = packed_doc_start(s, [[0, 4], [6], [0], []])
    reset = [0, 2]
    got = forward_backward(triton, t, state, doc)
    exp = forward_backward(reference, t, state, doc)
    assert_all_close(got, exp, F64)
    out = got[0]
    fresh, _ = reference(t, doc_start=doc)  # the same without any state
    with_state, _ = reference(t, state=state)  # the state without any reset
    for j in range(b):
        if j in reset:
            torch.testing.assert_close(out[:, j], fresh[:, j], **TOL64)
            # No gradient reaches a state that the filter ignores.
            assert got[2]["state.x"][j].abs().max() == 0
            assert got[2]["state.y"][j].abs().max() == 0
        else:
            torch.testing.assert_close(out[0, j], with_state[0, j], **TOL64)
            assert (out[0, j] - fresh[0, j]).abs().max() > 1e-3
            assert got[2]["state.y"][j].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize(("s", "b", "h"), [(63, 3, 96), (257, 1, 256)])
def test_low_precision_matches_fp32_reference(dtype: torch.dtype, s: int, b: int, h: int) -> None:
    t = make_inputs(s, b, h, dtype, seed=121)
    state = make_state(b, h, dtype, seed=122)
    doc = torch.rand(s, b, generator=torch.Generator().manual_seed(123)) < 0.1
    got = forward_backward(triton, t, state, doc)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2].values())
    # The reference in fp32 from the same (exactly upcast) values: the error measured is only
    # the kernels' (low-precision intermediates y, dr and the outputs' rounding).
    t32 = upcast(t)
    state32 = LFAState(*(v.detach().float().requires_grad_(True) for v in state))
    exp = forward_backward(reference, t32, state32, doc)
    assert_all_close(got, exp, dtype)


def test_autocast_cpu_bf16_follows_autocast_dtype() -> None:
    s, b, h = 33, 2, 64
    t = make_inputs(s, b, h, F32, seed=131)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = triton(t)
    assert out.dtype == torch.bfloat16
    g_out = cotangents(s, b, h)[0].float()
    grads = torch.autograd.grad((out.float() * g_out).sum(), list(t.values()))
    # Gradients reach the fp32 parameters in fp32, close to the fp32 reference.
    assert all(g.dtype == F32 for g in grads)
    ref, _ = reference(t)
    ref_grads = torch.autograd.grad((ref * g_out).sum(), list(t.values()))
    assert_rel_close(out, ref, REL[torch.bfloat16], "out")
    for name, a, e in zip(t, grads, ref_grads, strict=True):
        assert_rel_close(a, e, 3e-2, f"grad {name}")


def test_mixed_dtypes_are_cast_before_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 activations with fp32 parameters (no autocast): a GPU tl.dot refuses mixed operand
    # dtypes, so the wrapper computes in the activations' dtype, like autocast would.
    seen = []
    real = triton_kernels.shifted_gemm

    def recording(inp, w_cur, w_shift, *args, **kwargs):
        seen.append({inp.dtype, w_cur.dtype, w_shift.dtype})
        return real(inp, w_cur, w_shift, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "shifted_gemm", recording)
    s, b, h = 33, 2, 64
    t = make_inputs(s, b, h, F32, seed=161)
    x = t["x"].detach().to(torch.bfloat16).requires_grad_(True)
    state = make_state(b, h, F32, seed=162)
    out, _ = localized_filtering(x, *(t[k] for k in PARAMS), EPS, state=state, impl="triton")
    assert out.dtype == torch.bfloat16
    g_out = cotangents(s, b, h)[0].float()
    grads = torch.autograd.grad((out.float() * g_out).sum(), [x, *(t[k] for k in PARAMS)])
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    assert grads[0].dtype == torch.bfloat16 and all(g.dtype == F32 for g in grads[1:])
    ref, _ = reference(dict(t, x=x.detach().float()), state=state)
    assert_rel_close(out, ref, REL[torch.bfloat16], "out")


def test_norm_backward_in_few_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # The RMSNorm backward sums its weight gradient per block of rows into a bounded buffer;
    # with at most 2 programs every program walks many rows, and the result is unchanged.
    s, b, h = 257, 3, 96
    t = make_inputs(s, b, h, F64, seed=171)
    exp = forward_backward(reference, t, None, None)
    monkeypatch.setattr(triton_kernels, "MAX_NORM_BWD_PROGRAMS", 2)
    calls = []
    real = triton_kernels.rmsnorm_backward

    def recording(r, *args):
        dr, dg = real(r, *args)
        calls.append(r.shape[0])
        return dr, dg

    monkeypatch.setattr(triton_kernels, "rmsnorm_backward", recording)
    assert_all_close(forward_backward(triton, t, None, None), exp, F64)
    assert calls == [s * b]


def test_backward_is_deterministic() -> None:
    s, b, h = 257, 3, 96
    t = make_inputs(s, b, h, F32, seed=141)
    state = make_state(b, h, F32, seed=142)
    doc = torch.rand(s, b, generator=torch.Generator().manual_seed(143)) < 0.05
    first = forward_backward(triton, t, state, doc)[2]
    second = forward_backward(triton, t, state, doc)[2]
    for name in first:
        assert torch.equal(first[name], second[name]), f"grad {name} differs between runs"


@pytest.fixture
def count_triton_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the Triton entry point that localized_filtering imports at call time."""
    calls = [0]
    real = lfa_autograd.lfa_triton

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lfa_autograd, "lfa_triton", counting)
    monkeypatch.delenv("YUANLFA_LFA_IMPL", raising=False)
    return calls


def call_impl(t: dict[str, torch.Tensor], impl: str) -> torch.Tensor:
    return localized_filtering(t["x"], *(t[k] for k in PARAMS), EPS, impl=impl)[0]


def test_hidden_not_multiple_of_16_is_rejected(count_triton_calls: list[int]) -> None:
    t = make_inputs(3, 2, 40, F64, seed=151, requires_grad=False)
    with pytest.raises(ValueError, match="16"):
        call_impl(t, "triton")
    assert count_triton_calls[0] == 0
    # The reference takes any even hidden size.
    torch.testing.assert_close(call_impl(t, "reference"), reference(t)[0], **TOL64)


def test_env_var_routes_to_triton(
    count_triton_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_inputs(4, 2, 48, F64, seed=152, requires_grad=False)
    exp = reference(t)[0]
    monkeypatch.setenv("YUANLFA_LFA_IMPL", "triton")
    # The variable overrides the explicit impl too.
    for n, impl in enumerate(["auto", "reference"], start=1):
        torch.testing.assert_close(call_impl(t, impl), exp, **TOL64)
        assert count_triton_calls[0] == n
    monkeypatch.setenv("YUANLFA_LFA_IMPL", "reference")
    torch.testing.assert_close(call_impl(t, "triton"), exp, **TOL64)
    assert count_triton_calls[0] == 2


def test_auto_uses_reference_on_cpu(count_triton_calls: list[int]) -> None:
    t = make_inputs(4, 2, 48, F64, seed=153, requires_grad=False)
    torch.testing.assert_close(call_impl(t, "auto"), reference(t)[0], **TOL64)
    torch.testing.assert_close(call_impl(t, "reference"), reference(t)[0], **TOL64)
    assert count_triton_calls[0] == 0
    call_impl(t, "triton")
    assert count_triton_calls[0] == 1
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    # resolve_impl only looks at the device's type: CUDA picks the kernels (triton installed).
    assert resolve_impl("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("interpret", [None, "0"])
def test_forced_triton_on_cpu_needs_interpreter(
    count_triton_calls: list[int], monkeypatch: pytest.MonkeyPatch, interpret: str | None
) -> None:
    t = make_inputs(4, 2, 48, F64, seed=154, requires_grad=False)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call_impl(t, "triton")
    monkeypatch.setenv("YUANLFA_LFA_IMPL", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call_impl(t, "auto")
    assert count_triton_calls[0] == 0
    monkeypatch.delenv("YUANLFA_LFA_IMPL")
    torch.testing.assert_close(call_impl(t, "auto"), reference(t)[0], **TOL64)
