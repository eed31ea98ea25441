"""The LFA filter reference against the equations of docs/yuan2_facts.md 2, written here
independently.

Everything runs in fp64 so that a mismatch of the formula, not rounding, is what fails.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from yuanlfa.ops.lfa import LFAState, lfa_reference, localized_filtering

DT = torch.float64
EPS = 1e-6
TOL = {"rtol": 1e-10, "atol": 1e-10}

SHAPES = list(itertools.product([1, 2, 7, 63], [1, 3], [8, 48]))  # (s, b, h)


def make_inputs(
    s: int, b: int, h: int, seed: int = 0, requires_grad: bool = False
) -> dict[str, torch.Tensor]:
    """Random input and parameters with magnitudes O(1), so that every term matters."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(s, b, h, generator=g, dtype=DT),
        "conv1_weight": torch.randn(h // 2, h, 2, 1, generator=g, dtype=DT) / h**0.5,
        "conv1_bias": torch.randn(h // 2, generator=g, dtype=DT),
        "conv2_weight": torch.randn(h, h // 2, 2, 1, generator=g, dtype=DT) / h**0.5,
        "conv2_bias": torch.randn(h, generator=g, dtype=DT),
        "norm_weight": 1.0 + 0.5 * torch.randn(h, generator=g, dtype=DT),
    }
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def make_state(b: int, h: int, seed: int = 1, requires_grad: bool = False) -> LFAState:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, generator=g, dtype=DT).requires_grad_(requires_grad)
    y = torch.randn(b, h // 2, generator=g, dtype=DT).requires_grad_(requires_grad)
    return LFAState(x, y)


def rmsnorm(z: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_lfa(
    x: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    state: LFAState | None = None,
    doc_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loop over the three equations; returns (out [s, b, h], last x, last y)."""
    s, b, h = x.shape
    a0, a1 = conv1_weight[:, :, 0, 0], conv1_weight[:, :, 1, 0]
    b0, b1 = conv2_weight[:, :, 0, 0], conv2_weight[:, :, 1, 0]
    outs, last_y = [], []
    for j in range(b):
        x_prev = state.x[j] if state is not None else torch.zeros(h, dtype=x.dtype)
        y_prev = state.y[j] if state is not None else torch.zeros(h // 2, dtype=x.dtype)
        col = []
        for t in range(s):
            if doc_start is not None and bool(doc_start[t, j]):
                # A document start sees x_{-1} = 0 and y_{-1} = 0, as a fresh sequence does.
                x_prev = torch.zeros(h, dtype=x.dtype)
                y_prev = torch.zeros(h // 2, dtype=x.dtype)
            x_t = x[t, j]
            y_t = a0 @ x_prev + a1 @ x_t + conv1_bias
            z_t = b0 @ y_prev + b1 @ y_t + conv2_bias
            col.append(rmsnorm(z_t + x_t, norm_weight))
            x_prev, y_prev = x_t, y_t
        outs.append(torch.stack(col))
        last_y.append(y_prev)
    out = torch.stack(outs, dim=1)
    return out, x[-1], torch.stack(last_y)


def conv2d_lfa(
    x: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    norm_weight: torch.Tensor,
) -> torch.Tensor:
    """The released model's form: Conv2d over [b, h, s, 1], one zero row before each conv."""
    inp = x.permute(1, 2, 0).unsqueeze(-1)  # [b, h, s, 1]
    y = F.conv2d(F.pad(inp, (0, 0, 1, 0)), conv1_weight, conv1_bias)  # [b, h/2, s, 1]
    # Zero padding of y itself (not conv1 applied to a zero row, which would leave its bias).
    z = F.conv2d(F.pad(y, (0, 0, 1, 0)), conv2_weight, conv2_bias)  # [b, h, s, 1]
    z = z.squeeze(-1).permute(2, 0, 1)  # [s, b, h]
    return rmsnorm(z + x, norm_weight)


PARAMS = ["conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "norm_weight"]


def call(t: dict[str, torch.Tensor], **kw) -> tuple[torch.Tensor, LFAState]:
    return localized_filtering(t["x"], *(t[k] for k in PARAMS), EPS, **kw)


@pytest.mark.parametrize(("s", "b", "h"), SHAPES)
def test_matches_naive_loop(s: int, b: int, h: int) -> None:
    t = make_inputs(s, b, h)
    out, state = call(t)
    exp, exp_x, exp_y = naive_lfa(**t)
    assert out.shape == (s, b, h) and out.dtype == DT
    torch.testing.assert_close(out, exp, **TOL)
    torch.testing.assert_close(state.x, exp_x, **TOL)
    torch.testing.assert_close(state.y, exp_y, **TOL)


@pytest.mark.parametrize(("s", "b", "h"), SHAPES)
def test_matches_conv2d_form(s: int, b: int, h: int) -> None:
    t = make_inputs(s, b, h, seed=3)
    out, _ = call(t)
    torch.testing.assert_close(out, conv2d_lfa(**t), **TOL)


def test_lfa_reference_equals_dispatch() -> None:
    t = make_inputs(7, 3, 8, seed=5)
    out, state = lfa_reference(t["x"], *(t[k] for k in PARAMS), EPS)
    exp, exp_x, exp_y = naive_lfa(**t)
    torch.testing.assert_close(out, exp, **TOL)
    torch.testing.assert_close(state.y, exp_y, **TOL)


def test_conv2_pads_y_not_conv1_of_zero() -> None:
    # With a large conv1 bias, "conv1 of a zero row" would put B0 @ a into z_0; the correct
    # filter has only B1 y_0 + b there. The first token's output must not see conv1_bias via B0.
    t = make_inputs(1, 1, 8, seed=6)
    t["conv1_bias"] = torch.full_like(t["conv1_bias"], 10.0)
    out, _ = call(t)
    x0 = t["x"][0, 0]
    y0 = t["conv1_weight"][:, :, 1, 0] @ x0 + t["conv1_bias"]
    z0 = t["conv2_weight"][:, :, 1, 0] @ y0 + t["conv2_bias"]
    torch.testing.assert_close(out[0, 0], rmsnorm(z0 + x0, t["norm_weight"]), **TOL)


def test_kernel_index_zero_is_previous_token() -> None:
    # Only the previous-token slices set: token 0 gets no contribution from the convs' weights.
    t = make_inputs(3, 1, 8, seed=7)
    t["conv1_weight"][:, :, 1] = 0
    t["conv2_weight"][:, :, 1] = 0
    out, _ = call(t)
    b2 = t["conv2_bias"]
    torch.testing.assert_close(out[0, 0], rmsnorm(b2 + t["x"][0, 0], t["norm_weight"]), **TOL)
    # Token 1: y_1 = A0 x_0 + a, but z_1 = B0 y_0 + b with y_0 = a (A1 = 0).
    y0 = t["conv1_bias"]
    z1 = t["conv2_weight"][:, :, 0, 0] @ y0 + b2
    torch.testing.assert_close(out[1, 0], rmsnorm(z1 + t["x"][1, 0], t["norm_weight"]), **TOL)


GRAD_SHAPES = [(1, 1, 8), (2, 3, 8), (7, 3, 48), (63, 1, 8)]


@pytest.mark.parametrize(("s", "b", "h"), GRAD_SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_match_naive_loop(s: int, b: int, h: int, with_state: bool) -> None:
    t = make_inputs(s, b, h, seed=11, requires_grad=True)
    state = make_state(b, h, seed=12, requires_grad=True) if with_state else None
    g = torch.Generator().manual_seed(13)
    g_out = torch.randn(s, b, h, generator=g, dtype=DT)
    g_x = torch.randn(b, h, generator=g, dtype=DT)
    g_y = torch.randn(b, h // 2, generator=g, dtype=DT)
    leaves = list(t.values()) + (list(state) if state is not None else [])

    out, new_state = call(t, state=state)
    # Include the returned state so that its gradient path (used by chunked training) counts.
    loss = (out * g_out).sum() + (new_state.x * g_x).sum() + (new_state.y * g_y).sum()
    got = torch.autograd.grad(loss, leaves)

    exp_out, exp_x, exp_y = naive_lfa(**t, state=state)
    exp_loss = (exp_out * g_out).sum() + (exp_x * g_x).sum() + (exp_y * g_y).sum()
    exp = torch.autograd.grad(exp_loss, leaves)
    names = list(t) + (["state.x", "state.y"] if state is not None else [])
    for name, a, e in zip(names, got, exp, strict=True):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_gradcheck_tiny() -> None:
    t = make_inputs(3, 2, 4, seed=21, requires_grad=True)
    state = make_state(2, 4, seed=22, requires_grad=True)
    doc = torch.tensor([[False, False], [False, True], [True, False]])

    def fn(x, w1, b1, w2, b2, nw, sx, sy):
        out, st = localized_filtering(
            x, w1, b1, w2, b2, nw, EPS, state=LFAState(sx, sy), doc_start=doc
        )
        return out, st.x, st.y

    assert torch.autograd.gradcheck(fn, (*t.values(), *state), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "splits",
    [[1], [32], [62], [1, 2, 3], [7, 30, 31], list(range(1, 63, 9))],
)
def test_chunks_with_state_equal_one_pass(splits: list[int]) -> None:
    s, b, h = 63, 3, 48
    t = make_inputs(s, b, h, seed=31, requires_grad=True)
    full, full_state = call(t)

    bounds = [0, *splits, s]
    outs, state = [], None
    for lo, hi in itertools.pairwise(bounds):
        chunk = dict(t, x=t["x"][lo:hi])
        out, state = call(chunk, state=state)
        outs.append(out)
    chunked = torch.cat(outs)
    torch.testing.assert_close(chunked, full, **TOL)
    torch.testing.assert_close(state.x, full_state.x, **TOL)
    torch.testing.assert_close(state.y, full_state.y, **TOL)

    # The state carries gradients across chunk boundaries: training on chunks is exact.
    g = torch.randn(s, b, h, generator=torch.Generator().manual_seed(32), dtype=DT)
    leaves = list(t.values())
    grads_full = torch.autograd.grad((full * g).sum(), leaves)
    grads_chunk = torch.autograd.grad((chunked * g).sum(), leaves)
    for a, e in zip(grads_chunk, grads_full, strict=True):
        torch.testing.assert_close(a, e, **TOL)


def test_state_continues_from_given_tokens() -> None:
    # A state made by hand from two earlier tokens equals running those tokens first.
    t = make_inputs(5, 2, 8, seed=35)
    prefix = make_inputs(2, 2, 8, seed=36)["x"]
    both = dict(t, x=torch.cat((prefix, t["x"])))
    full, _ = call(both)
    a0, a1 = t["conv1_weight"][:, :, 0, 0], t["conv1_weight"][:, :, 1, 0]
    y_last = prefix[0] @ a0.T + prefix[1] @ a1.T + t["conv1_bias"]  # [b, h/2]
    out, _ = call(t, state=LFAState(prefix[1], y_last))
    torch.testing.assert_close(out, full[2:], **TOL)


def packed_doc_start(s: int, starts_per_row: list[list[int]]) -> torch.Tensor:
    doc = torch.zeros(s, len(starts_per_row), dtype=torch.bool)
    for j, starts in enumerate(starts_per_row):
        doc[starts, j] = True
    return doc


@pytest.mark.parametrize(
    "starts_per_row",
    [
        [[0, 5, 6, 40]],
        [[0, 20], [0], [0, 1, 2, 62]],
        # A row whose first token continues an earlier document (no start at 0).
        [[10, 11], [0, 31]],
    ],
)
def test_doc_start_equals_separate_documents(starts_per_row: list[list[int]]) -> None:
    s, h = 63, 8
    b = len(starts_per_row)
    t = make_inputs(s, b, h, seed=41)
    doc = packed_doc_start(s, starts_per_row)
    out, state = call(t, doc_start=doc)
    for j, starts in enumerate(starts_per_row):
        bounds = sorted({0, *starts, s})
        for lo, hi in itertools.pairwise(bounds):
            piece = dict(t, x=t["x"][lo:hi, j : j + 1])
            exp, exp_state = call(piece)
            torch.testing.assert_close(out[lo:hi, j : j + 1], exp, **TOL)
        torch.testing.assert_close(state.y[j : j + 1], exp_state.y, **TOL)
    # And against the naive loop, which resets by its own rule.
    exp_all, _, exp_y = naive_lfa(**t, doc_start=doc)
    torch.testing.assert_close(out, exp_all, **TOL)
    torch.testing.assert_close(state.y, exp_y, **TOL)


def test_doc_start_is_not_a_no_op() -> None:
    t = make_inputs(9, 1, 8, seed=43)
    doc = packed_doc_start(9, [[0, 4]])
    with_reset, _ = call(t, doc_start=doc)
    without, _ = call(t)
    torch.testing.assert_close(with_reset[:4], without[:4], **TOL)
    # Token 4 and token 5 (whose y_{t-1} is y_4) both change when the filter restarts at 4.
    assert (with_reset[4] - without[4]).abs().max() > 1e-3
    assert (with_reset[5] - without[5]).abs().max() > 1e-3
    torch.testing.assert_close(call(t, doc_start=torch.zeros(9, 1, dtype=torch.bool))[0], without)


def test_doc_start_at_first_token_ignores_state() -> None:
    t = make_inputs(6, 2, 8, seed=45)
    state = make_state(2, 8, seed=46)
    doc = packed_doc_start(6, [[0], [3]])
    out, _ = call(t, state=state, doc_start=doc)
    fresh, _ = call(t)
    torch.testing.assert_close(out[:, 0], fresh[:, 0], **TOL)
    exp, _, _ = naive_lfa(**t, state=state, doc_start=doc)
    torch.testing.assert_close(out, exp, **TOL)


def test_fp32_matches_fp64_naive() -> None:
    # fp32 inputs: results in fp32, close to the exact fp64 filter.
    t = make_inputs(63, 3, 48, seed=51)
    out32, _ = call({k: v.float() for k, v in t.items()})
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), naive_lfa(**t)[0], rtol=1e-5, atol=1e-5)


def valid() -> dict[str, torch.Tensor]:
    return make_inputs(4, 2, 8)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("conv1_weight", (4, 8, 2)),
        ("conv1_weight", (8, 4, 2, 1)),
        ("conv1_weight", (4, 8, 1, 1)),
        ("conv1_bias", (8,)),
        ("conv2_weight", (4, 8, 2, 1)),
        ("conv2_weight", (8, 4, 1, 2)),
        ("conv2_bias", (4,)),
        ("norm_weight", (4,)),
    ],
)
def test_rejects_wrong_weight_shapes(name: str, shape: tuple[int, ...]) -> None:
    t = valid()
    t[name] = torch.zeros(shape, dtype=DT)
    with pytest.raises(ValueError, match=name):
        call(t)


@pytest.mark.parametrize("shape", [(4, 8), (4, 2, 1, 8), (8,)])
def test_rejects_non_3d_input(shape: tuple[int, ...]) -> None:
    t = valid()
    t["x"] = torch.zeros(shape, dtype=DT)
    with pytest.raises(ValueError):
        call(t)


@pytest.mark.parametrize(
    ("x_shape", "y_shape"),
    [((2, 4), (2, 4)), ((2, 8), (2, 8)), ((1, 8), (1, 4)), ((3, 8), (2, 4)), ((8,), (4,))],
)
def test_rejects_bad_state_shapes(x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    state = LFAState(torch.zeros(x_shape, dtype=DT), torch.zeros(y_shape, dtype=DT))
    with pytest.raises(ValueError, match="state"):
        call(valid(), state=state)


@pytest.mark.parametrize(
    "doc", [torch.zeros(4, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.bool)]
)
def test_rejects_bad_doc_start(doc: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="doc_start"):
        call(valid(), doc_start=doc)


def test_rejects_odd_hidden() -> None:
    t = make_inputs(3, 1, 8)
    t["x"] = torch.zeros(3, 1, 7, dtype=DT)
    with pytest.raises(ValueError):
        call(t)


# The Triton path on CPU tensors needs the interpreter (a GPU run of the suite may set
# TRITON_INTERPRET=0; tests/ops/test_lfa_triton_gpu.py covers the compiled kernels there).
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
)


@needs_interpreter
def test_env_triton_overrides_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest.py sets TRITON_INTERPRET=1, so "triton" runs the kernels on CPU. The variable
    # overrides an explicit impl too (the contract of resolve_impl): hidden 8 is below the
    # kernels' multiple of 16, so the Triton path is recognisable by its error.
    pytest.importorskip("triton")
    monkeypatch.setenv("YUANLFA_LFA_IMPL", "triton")
    with pytest.raises(ValueError, match="16"):
        call(valid(), impl="reference")
    t = make_inputs(4, 2, 16, seed=2)
    torch.testing.assert_close(call(t, impl="reference")[0], naive_lfa(**t)[0], **TOL)


def test_env_unknown_impl_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YUANLFA_LFA_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="cuda-magic"):
        call(valid())


def test_explicit_impls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YUANLFA_LFA_IMPL", raising=False)
    exp = naive_lfa(**valid())[0]
    for impl in ("auto", "reference"):
        torch.testing.assert_close(call(valid(), impl=impl)[0], exp, **TOL)
    with pytest.raises(ValueError, match="nope"):
        call(valid(), impl="nope")


@needs_interpreter
def test_explicit_triton_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("YUANLFA_LFA_IMPL", raising=False)
    # The Triton kernels (interpreted on CPU) need hidden % 16 == 0; the reference does not.
    with pytest.raises(ValueError, match="16"):
        call(valid(), impl="triton")
    t = make_inputs(4, 2, 16, seed=2)
    torch.testing.assert_close(call(t, impl="triton")[0], naive_lfa(**t)[0], **TOL)


def test_triton_on_cpu_without_interpreter_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YUANLFA_LFA_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call(make_inputs(4, 2, 16), impl="triton")
    torch.testing.assert_close(call(valid(), impl="auto")[0], naive_lfa(**valid())[0], **TOL)
