"""RoPE (rotate-half convention) against a complex-number rotation written here."""

from __future__ import annotations

import pytest
import torch

from yuanlfa.ops.rope import apply_rope, rope_cos_sin

# The library computes angles in fp32 (documented), so the comparison with exact fp64 angles
# allows fp32 angle rounding: |error| <~ position * 1.2e-7, with positions below 100 here.
TOL = {"rtol": 2e-5, "atol": 2e-5}


def complex_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """x: [s, b, heads, d], pos: [s, b]. Pair (i, i + d/2) is the complex x_i + j x_{i+d/2},
    multiplied by exp(j * pos * base^(-2i/d)) in fp64."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)  # [d/2]
    theta = pos.to(torch.float64)[:, :, None, None] * inv_freq  # [s, b, 1, d/2]
    xd = x.to(torch.float64)
    z = torch.complex(xd[..., :half], xd[..., half:]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag), dim=-1)


def rotation_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """The same with an explicit 2x2 rotation per pair, by loops (slow, for a small case)."""
    s, b, heads, d = x.shape
    half = d // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for t in range(s):
        for j in range(b):
            for i in range(half):
                theta = float(pos[t, j]) * base ** (-2.0 * i / d)
                c, sn = torch.tensor(theta).cos(), torch.tensor(theta).sin()
                rot = torch.stack((torch.stack((c, -sn)), torch.stack((sn, c)))).double()
                pair = torch.stack((x[t, j, :, i], x[t, j, :, i + half]), dim=0).double()
                res = rot @ pair  # [2, heads]
                out[t, j, :, i], out[t, j, :, i + half] = res[0], res[1]
    return out


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    cos, sin = rope_cos_sin(pos, x.shape[-1], base, x.dtype)
    return apply_rope(x, cos, sin)


def positions(s: int, b: int) -> torch.Tensor:
    return torch.arange(s).unsqueeze(1).expand(s, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("s", "b", "heads", "d"), [(1, 1, 1, 2), (7, 3, 4, 16), (63, 2, 3, 100)])
def test_matches_complex_rotation(dtype: torch.dtype, s: int, b: int, heads: int, d: int) -> None:
    x = torch.randn(s, b, heads, d, generator=torch.Generator().manual_seed(s), dtype=dtype)
    pos = positions(s, b)
    out = rope(x, pos)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), complex_rope(x, pos, 10000.0), **TOL)


def test_matches_explicit_rotation_and_other_base() -> None:
    x = torch.randn(5, 2, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pos = torch.tensor([[0, 3], [1, 9], [2, 0], [7, 1], [40, 2]])
    for base in (10000.0, 500.0):
        torch.testing.assert_close(rope(x, pos, base), rotation_rope(x, pos, base), **TOL)


def test_cos_sin_tables() -> None:
    pos = torch.tensor([[0, 5], [1, 2], [17, 0]])
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float64)
    assert cos.shape == sin.shape == (3, 2, 1, 8)
    inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    theta = pos.double()[..., None] * inv
    torch.testing.assert_close(cos[:, :, 0], torch.cat((theta.cos(), theta.cos()), -1), **TOL)
    torch.testing.assert_close(sin[:, :, 0], torch.cat((theta.sin(), theta.sin()), -1), **TOL)
    # Position 0 is the identity rotation exactly.
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    assert torch.equal(rope(x, torch.zeros(1, 1, dtype=torch.long)), x)


def test_rotation_preserves_norm_per_pair() -> None:
    x = torch.randn(9, 2, 3, 16, dtype=torch.float64)
    out = rope(x, positions(9, 2))
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2
    # cos/sin come from fp32 tables, so cos^2 + sin^2 = 1 holds to fp32 precision only.
    torch.testing.assert_close(pair_norm(out), pair_norm(x), rtol=1e-6, atol=1e-6)


def test_restarting_positions_rotate_like_sequence_start() -> None:
    # Token 3 of [0, 1, 2, 0, 1] carries position 0: it must come out unchanged like token 0,
    # and token 4 like token 1, for the same vector.
    x = torch.randn(5, 1, 4, 16, generator=torch.Generator().manual_seed(2))
    x[3], x[4] = x[0], x[1]
    pos = torch.tensor([0, 1, 2, 0, 1]).unsqueeze(1)
    out = rope(x, pos)
    assert torch.equal(out[3], out[0]) and torch.equal(out[4], out[1])
    assert torch.equal(out[0], x[0])
    # The positions really are per token: with 0..4 token 3 is rotated differently.
    out_plain = rope(x, positions(5, 1))
    assert (out_plain[3] - out[3]).abs().max() > 1e-2


def test_per_batch_positions() -> None:
    # Each batch row follows its own positions (packed documents differ between rows).
    x = torch.randn(4, 2, 2, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 0], [1, 1], [2, 0], [3, 1]])
    out = rope(x, pos)
    for j in range(2):
        torch.testing.assert_close(out[:, j : j + 1], rope(x[:, j : j + 1], pos[:, j : j + 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_product_depends_only_on_position_difference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    d = 32
    q = torch.randn(d, generator=g, dtype=dtype)
    k = torch.randn(d, generator=g, dtype=dtype)

    def score(m: int, n: int) -> torch.Tensor:
        qr = rope(q.view(1, 1, 1, d), torch.tensor([[m]]))
        kr = rope(k.view(1, 1, 1, d), torch.tensor([[n]]))
        return (qr * kr).sum()

    for delta in (0, 1, 5, 13):
        ref = score(delta, 0)
        for start in (1, 7, 30):
            torch.testing.assert_close(score(start + delta, start), ref, rtol=1e-4, atol=1e-4)
    # And it does depend on the difference (otherwise the check above is vacuous).
    assert (score(5, 0) - score(0, 0)).abs() > 1e-2


def test_gradient_is_the_inverse_rotation() -> None:
    # RoPE is orthogonal: the backward of a rotation by theta is a rotation by -theta.
    x = torch.randn(6, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    pos = positions(6, 2)
    g = torch.randn(6, 2, 3, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad((rope(x, pos) * g).sum(), x)
    torch.testing.assert_close(grad, complex_rope(g, -pos, 10000.0), **TOL)
