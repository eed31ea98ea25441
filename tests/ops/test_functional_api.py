"""The functional and module API: yuanlfa.localized_filtering and yuanlfa.LocalizedFiltering
against the reference implementation and docs/yuan2_facts.md by hand, and causal_conv (the filter
variants' building block) against torch's convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import yuanlfa
from tests.model.test_model import lfa_by_hand
from yuanlfa.ops.lfa import LFAState, lfa_reference

F64 = torch.float64


def _weights(h: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64) * 0.3

    return {
        "conv1.weight": rnd(h // 2, h, 2, 1),
        "conv1.bias": rnd(h // 2),
        "conv2.weight": rnd(h, h // 2, 2, 1),
        "conv2.bias": rnd(h),
        "norm.weight": 1 + rnd(h),
    }


def test_functional_equals_reference_and_by_hand_with_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    s, b, h = 13, 3, 10
    w = {k: v.requires_grad_() for k, v in _weights(h, gen).items()}
    x = torch.randn(s, b, h, generator=gen, dtype=F64, requires_grad=True)
    args = [w[k] for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")]
    out, state = yuanlfa.localized_filtering(x, *args, w["norm.weight"], impl="reference")
    ref, _ = lfa_reference(x, *args, w["norm.weight"])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, lfa_by_hand(x, w))
    assert torch.equal(state.x, x[-1])
    g = torch.randn(s, b, h, generator=gen, dtype=F64)
    grads = torch.autograd.grad(out, [x, *w.values()], g)
    ref_grads = torch.autograd.grad(lfa_by_hand(x, w), [x, *w.values()], g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    # Chunked with the state equals one pass.
    first, st = yuanlfa.localized_filtering(x[:5], *args, w["norm.weight"], impl="reference")
    rest, _ = yuanlfa.localized_filtering(x[5:], *args, w["norm.weight"], state=st)
    torch.testing.assert_close(torch.cat((first, rest)), out)


def test_functional_names_the_wrong_shape() -> None:
    x = torch.randn(4, 2, 8)
    w = _weights(8, torch.Generator().manual_seed(1))
    args = [w[k].float() for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")]
    with pytest.raises(ValueError, match=r"conv2_bias must have shape \(8,\)"):
        yuanlfa.localized_filtering(x, *args[:3], torch.zeros(5), w["norm.weight"].float())
    with pytest.raises(ValueError, match="seq, batch, hidden"):
        yuanlfa.localized_filtering(x[0], *args, w["norm.weight"].float())


def test_module_is_initialized_and_matches_the_function() -> None:
    torch.manual_seed(0)
    module = yuanlfa.LocalizedFiltering(16)
    assert torch.equal(module.norm.weight, torch.ones(16))
    bound = 1 / (2 * 16) ** 0.5  # Conv2d's default for conv1: fan_in = 16 channels * 2 taps
    assert 0 < module.conv1.weight.abs().max() <= bound
    x = torch.randn(7, 2, 16)
    out, state = module(x)
    ref, _ = yuanlfa.localized_filtering(
        x, module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias,
        module.norm.weight, module.eps,
    )  # fmt: skip
    torch.testing.assert_close(out, ref)
    assert isinstance(state, LFAState)


@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
@pytest.mark.parametrize("s", [1, 5, 23])
def test_causal_conv_equals_torch_conv(kernel: int, s: int) -> None:
    gen = torch.Generator().manual_seed(kernel * 100 + s)
    b, c_in, c_out = 2, 6, 5
    x = torch.randn(s, b, c_in, generator=gen, dtype=F64)
    weight = torch.randn(c_out, c_in, kernel, 1, generator=gen, dtype=F64)
    bias = torch.randn(c_out, generator=gen, dtype=F64)
    out = yuanlfa.causal_conv(x, weight, bias)
    # torch's conv1d on [b, c, s], left-padded with kernel - 1 zeros: the same causal filter.
    ref = F.conv1d(F.pad(x.permute(1, 2, 0), (kernel - 1, 0)), weight[..., 0], bias)
    torch.testing.assert_close(out, ref.permute(2, 0, 1))


def test_causal_conv_restarts_at_documents() -> None:
    gen = torch.Generator().manual_seed(3)
    s, b, c = 12, 2, 4
    x = torch.randn(s, b, c, generator=gen, dtype=F64)
    weight = torch.randn(c, c, 3, 1, generator=gen, dtype=F64)
    starts = torch.zeros(s, b, dtype=torch.bool)
    starts[5, 0] = starts[6, 1] = starts[7, 1] = True
    out = yuanlfa.causal_conv(x, weight, doc_start=starts)
    for row in range(b):
        bounds = [0, *torch.nonzero(starts[:, row]).flatten().tolist(), s]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            alone = yuanlfa.causal_conv(x[lo:hi, row : row + 1], weight)
            torch.testing.assert_close(out[lo:hi, row : row + 1], alone)


def test_lfa_no_norm_plus_the_norm_is_lfa() -> None:
    """The variant shares LFA's convolution math exactly (kernel-2 causal_conv)."""
    from yuanlfa.model.variants import LocalizedFilteringNoNorm
    from yuanlfa.ops.rmsnorm import rms_norm

    torch.manual_seed(1)
    lfa = yuanlfa.LocalizedFiltering(8, impl="reference")
    plain = LocalizedFilteringNoNorm(8)
    plain.load_state_dict({k: v for k, v in lfa.state_dict().items() if "norm" not in k})
    x = torch.randn(9, 2, 8)
    starts = torch.rand(9, 2) < 0.3
    want, _ = lfa(x, doc_start=starts)
    got = rms_norm(plain(x, doc_start=starts), lfa.norm.weight, lfa.eps)
    assert torch.equal(got, want)
