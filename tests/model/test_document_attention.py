"""Document-aware attention: a packed row gives each document exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch

import yuanlfa.model.attention as attention
from tests.model.test_model import model_cfg, randomize
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.model import YuanModel
from yuanlfa.model.attention import causal_attention

# Row 0 starts inside a document (positions 3.. as a packed sample can); row 1 has a
# one-token document.
ROWS = [[("mid", 3, 6), ("a", 0, 9), ("b", 0, 5)], [("c", 0, 1), ("d", 0, 12), ("e", 0, 7)]]
SEQ = 20


def packed(vocab: int, seed: int = 0):
    """Token and position rows [2, SEQ], and each document's (row, start, tokens, positions)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(2, SEQ, dtype=torch.long)
    positions = torch.zeros(2, SEQ, dtype=torch.long)
    docs = []
    for r, row in enumerate(ROWS):
        at = 0
        for _, first_pos, n in row:
            ids = torch.randint(0, vocab, (n,), generator=g)
            pos = torch.arange(first_pos, first_pos + n)
            tokens[r, at : at + n], positions[r, at : at + n] = ids, pos
            docs.append((r, at, ids, pos))
            at += n
        assert at == SEQ
    return tokens, positions, docs


def build(layers: int = 2, **model: object) -> YuanModel:
    torch.manual_seed(0)
    net = YuanModel(model_cfg(layers, **model))
    randomize(net, seed=1)
    return net


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_logits_and_grads_equal_documents_alone(backend: str) -> None:
    net = build(document_attention=True, lfa_reset_at_doc_start=True, attention_backend=backend)
    tokens, positions, docs = packed(net.cfg.vocab_size)
    logits = net(tokens, positions)
    loss = logits.float().logsumexp(-1).sum()
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    alone_loss = 0.0
    for r, at, ids, pos in docs:
        out = net(ids[None], pos[None])
        torch.testing.assert_close(out[0], logits[r, at : at + len(ids)], rtol=1e-5, atol=1e-5)
        alone_loss = alone_loss + out.float().logsumexp(-1).sum()
    alone_loss.backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, packed_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_without_the_mask_documents_see_each_other() -> None:
    # The equivalence above is not automatic: plain causal attention leaks across documents.
    tokens, positions, docs = packed(128)
    net = build(lfa_reset_at_doc_start=True)
    logits = net(tokens, positions)
    r, at, ids, pos = docs[1]
    assert not torch.allclose(net(ids[None], pos[None])[0], logits[r, at : at + len(ids)])


def test_no_lfa_document_attention_alone() -> None:
    net = build(lfa=False, document_attention=True)
    tokens, positions, docs = packed(net.cfg.vocab_size, seed=3)
    logits = net(tokens, positions)
    for r, at, ids, pos in docs:
        torch.testing.assert_close(
            net(ids[None], pos[None])[0], logits[r, at : at + len(ids)], rtol=1e-5, atol=1e-5
        )


def test_one_document_equals_causal() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, 3, 8, generator=g) for _ in range(3))
    none = torch.zeros(9, 2, dtype=torch.bool)
    torch.testing.assert_close(
        causal_attention(q, k, v, doc_start=none), causal_attention(q, k, v), rtol=1e-6, atol=1e-6
    )


def test_document_mask_refuses_a_cache() -> None:
    q = torch.randn(2, 1, 1, 4)
    k = torch.randn(5, 1, 1, 4)
    with pytest.raises(ValueError, match="cached decoding"):
        causal_attention(q, k, k, doc_start=torch.zeros(2, 1, dtype=torch.bool))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="lfa_reset_at_doc_start=true"):
        config_from_dict({"model": {"document_attention": True}})
    with pytest.raises(ConfigError, match="reset_position_ids=true"):
        config_from_dict(
            {
                "model": {"document_attention": True, "lfa_reset_at_doc_start": True},
                "data": {"reset_position_ids": False},
            }
        )
    config_from_dict({"model": {"document_attention": True, "lfa": False}})


def random_starts(s: int, b: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(s, b, generator=g) < 0.05
    starts[3, 0] = True
    return starts.to(device)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_cpu() -> None:
    # torch 2.13 runs FlexAttention's forward eagerly on CPU (no CPU backward): enough to check
    # the document-causal block mask against SDPA's boolean mask.
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    s, b, heads, d = 256, 2, 2, 16
    q, k, v = (torch.randn(b, heads, s, d, generator=g) for _ in range(3))
    starts = random_starts(s, b, seed=1)
    flex = attention.flex_document_attention(q, k, v, starts)
    mask = attention.document_layout(starts, "dense")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_layouts_are_computed_once_per_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = attention._make_layout
    monkeypatch.setattr(
        attention, "_make_layout", lambda t, kind: made.append(kind) or real(t, kind)
    )
    net = build(layers=3, document_attention=True, lfa_reset_at_doc_start=True)
    tokens, positions, _ = packed(net.cfg.vocab_size)
    net(tokens, positions).sum().backward()
    assert made == ["dense"]  # one mask for the three layers, forward and backward
    net(tokens, positions)  # the next micro-batch: a new doc_start tensor
    assert made == ["dense", "dense"]


def test_layout_cache_follows_the_tensor() -> None:
    starts = random_starts(16, 2, seed=2)
    first = attention.document_layout(starts, "varlen")
    assert attention.document_layout(starts, "varlen") is first
    starts[8, 1] = True  # edited in place: the version changes
    cu, longest = attention.document_layout(starts, "varlen")
    assert cu.dtype == torch.int32 and 8 + 16 in cu.tolist()
    other = random_starts(16, 2, seed=2)
    assert attention.document_layout(other, "varlen") is not first
    assert torch.equal(attention.document_layout(other, "varlen")[0], first[0])
    assert longest == int((cu[1:] - cu[:-1]).max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_equals_sdpa_gpu() -> None:
    # The compiled FlexAttention kernel, forward and backward, against SDPA's boolean mask.
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g
        ).requires_grad_()
        for _ in range(3)
    )
    starts = random_starts(256, 2, seed=3, device="cuda")
    flex = attention.flex_document_attention(q, k, v, starts)
    mask = attention.document_layout(starts, "dense")
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask)
    torch.testing.assert_close(flex.float(), ref, rtol=2e-2, atol=2e-2)
    g_out = torch.randn(ref.shape, device="cuda", generator=g)
    grads = torch.autograd.grad(flex.float(), (q, k, v), g_out)
    ref_grads = torch.autograd.grad(ref, leaves, g_out)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), e, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_equals_sdpa_gpu() -> None:
    pytest.importorskip("flash_attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(64, 3, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    starts = torch.zeros(64, 3, dtype=torch.bool, device="cuda")
    starts[[5, 17, 40], 0] = True
    starts[[1, 63], 2] = True
    flash = causal_attention(q, k, v, backend="flash", doc_start=starts)
    ref = causal_attention(q.float(), k.float(), v.float(), backend="sdpa", doc_start=starts)
    torch.testing.assert_close(flash.float(), ref, rtol=2e-2, atol=2e-2)
