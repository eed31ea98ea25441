"""The LFA attention block: V from x, [Q|K] from the filtered x, RoPE, causal attention."""

from __future__ import annotations

import importlib.util
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from yuanlfa.config import ModelConfig
from yuanlfa.model.cache import LayerCache
from yuanlfa.model.dropout import DropoutKey, LayerDropout
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.model.registry import build_component
from yuanlfa.ops.rope import apply_rope

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _use_flash(q: torch.Tensor, backend: str) -> bool:
    usable = _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not usable:
        raise RuntimeError(
            "model.attention_backend=flash needs the flash-attn package, a CUDA device and "
            "bf16/fp16 activations; use attention_backend=auto"
        )
    return usable and backend in ("auto", "flash")


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    doc_start: torch.Tensor | None = None,
    dropout: LayerDropout | None = None,
) -> torch.Tensor:
    """Causal attention where the queries are the last ``s`` of the ``past + s`` keys.

    q: [s, b, heads, d]; k, v: [past + s, b, heads, d]. Returns [s, b, heads, d].
    doc_start: optional bool [s, b], True where a document starts: each token then attends only
    to the earlier tokens of its own document (packed samples; needs past == 0).
    dropout: drop attention probabilities with the layout-free masks of
    :mod:`yuanlfa.model.dropout` (every backend then takes :func:`dropout_attention`).
    """
    s, kv = q.shape[0], k.shape[0]
    past = kv - s
    if doc_start is not None and past:
        raise ValueError("document masks apply to whole sequences, not to cached decoding")
    if dropout is not None and dropout.p > 0:
        if _use_flash(q, backend):
            return flash_dropout_attention(q, k, v, doc_start, dropout)
        return dropout_attention(q, k, v, doc_start, dropout)
    if doc_start is not None:
        return document_attention(q, k, v, doc_start, backend)
    if _use_flash(q, backend):
        from flash_attn import flash_attn_func

        # flash-attn aligns the causal mask to the bottom-right, which is what a cache needs.
        out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True)
        return out.transpose(0, 1)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, len, d]
    if backend == "math":
        ctx = torch.nn.attention.SDPBackend.MATH
        with torch.nn.attention.sdpa_kernel(ctx):
            out = _sdpa(qb, kb, vb, s, past)
    else:
        out = _sdpa(qb, kb, vb, s, past)
    return out.permute(2, 0, 1, 3)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int, past: int) -> torch.Tensor:
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if s == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal aligns a non-square mask to the top-left; build the bottom-right one.
    rows = torch.arange(s, device=q.device).unsqueeze(1) + past
    mask = torch.arange(past + s, device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_start: torch.Tensor | None,
    dropout: LayerDropout,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with dropout on the probabilities, then @ v, spelled out.

    q: [s, b, heads, d]; k, v: [past + s, b, heads, d]. The fused kernels (flash-attn, SDPA)
    draw their dropout masks from the process's generator by LOCAL head index, which differs
    between tp layouts; here each (sample, global head) mask comes from its own seed
    (:class:`~yuanlfa.model.dropout.DropoutKey`), so every layout trains the same model. The
    price is the [b, heads, s, s] score matrix per layer (what Megatron's unfused attention keeps
    too): the softmax in fp32, the probabilities saved for backward in the activation dtype. On
    CUDA with flash-attn, :func:`flash_dropout_attention` runs instead.
    """
    s, b, heads, d = q.shape
    kv = k.shape[0]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, len, d]
    scores = torch.matmul(qb, kb.transpose(-1, -2)).float() * d**-0.5  # [b, heads, s, kv]
    if doc_start is not None:
        allowed = document_layout(doc_start, "dense")  # [b, 1, s, s]
    else:
        rows = torch.arange(s, device=q.device).unsqueeze(1) + (kv - s)
        allowed = torch.arange(kv, device=q.device).unsqueeze(0) <= rows  # [s, kv]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    keep = dropout.keep_mask(heads, (s, kv), q.device)
    probs = (probs * keep * (1.0 / (1.0 - dropout.p))).to(v.dtype)
    return torch.matmul(probs, vb).permute(2, 0, 1, 3)


def flash_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_start: torch.Tensor | None,
    dropout: LayerDropout,
) -> torch.Tensor:
    """flash-attn's fused dropout (no score matrix kept, as Yuan 2.0's --flash-attn-drop), one
    call per sample with the CUDA generator seeded from (seed, step, sample, layer, first
    head): the same masks whatever the pp or dp layout, and again when recomputed. flash-attn
    draws per LOCAL head index, so unlike :func:`dropout_attention` the masks change with tp.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    s, b, heads, d = q.shape
    outs = []
    for i in range(b):
        one = [t[:, i : i + 1].transpose(0, 1) for t in (q, k, v)]  # [1, len, heads, d]
        with torch.random.fork_rng(devices=[q.device]):
            torch.cuda.manual_seed(dropout.sample_seed(i))
            if doc_start is None:
                out = flash_attn_func(*one, dropout_p=dropout.p, causal=True)
            else:
                cu, longest = _make_layout(doc_start[:, i : i + 1], "varlen")
                flat = [t.reshape(-1, heads, d) for t in one]
                out = flash_attn_varlen_func(
                    *flat, cu, cu, longest, longest, dropout_p=dropout.p, causal=True
                ).view(1, s, heads, d)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=1)


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor, backend: str
) -> torch.Tensor:
    """Causal attention within documents. q, k, v: [s, b, heads, d]; doc_start: bool [s, b].

    The first token of every row starts a document whatever doc_start says (a sample may begin
    inside one). In order of preference: flash-attn's variable-length kernel, FlexAttention with
    a document-causal block mask (CUDA, backend auto), SDPA with a boolean mask. What each needs
    from doc_start (cu_seqlens, the block mask, the boolean mask) is computed once per
    micro-batch and reused by every layer (``document_layout``): the model passes the same
    doc_start tensor to all of them, so no layer repeats the host syncs or the mask.
    """
    s, b, heads, d = q.shape
    if _use_flash(q, backend):
        from flash_attn import flash_attn_varlen_func

        cu, longest = document_layout(doc_start, "varlen")
        flat = [t.transpose(0, 1).reshape(b * s, heads, d) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
        return out.view(b, s, heads, d).transpose(0, 1)
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    if backend == "auto" and q.is_cuda and _HAS_FLEX:
        out = flex_document_attention(qb, kb, vb, doc_start)
    else:
        mask = document_layout(doc_start, "dense")  # [b, 1, s, s]
        if backend == "math":
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.permute(2, 0, 1, 3)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor
) -> torch.Tensor:
    """FlexAttention with a document-causal block mask. q, k, v: [b, heads, s, d].

    Compiled on CUDA (the fused kernel skips the blocks the mask empties); elsewhere it runs
    eagerly, forward only (torch 2.13 has no CPU backward for it), which the tests use to check
    it against SDPA.
    """
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = document_layout(doc_start, "block")
    if q.is_cuda:
        global _FLEX_COMPILED
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        return _FLEX_COMPILED(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
_FLEX_COMPILED = None
# The last micro-batch's layouts: (weak reference to its doc_start, its version) -> by kind.
_LAYOUT_CACHE: dict[str, object] = {"key": None, "layouts": {}}


def document_layout(doc_start: torch.Tensor, kind: str):
    """What document attention needs from doc_start [s, b], computed once per doc_start tensor.

    kind "varlen": (cu_seqlens int32 [docs + 1], longest document) of the flattened [b * s]
    token stream, for flash-attn (two host syncs, now once per micro-batch, not per layer);
    "block": FlexAttention's BlockMask; "dense": the boolean mask [b, 1, s, s] for SDPA.
    The cache holds the last doc_start only (weakly), so a new micro-batch or an in-place edit
    (the tensor's version changes) recomputes.
    """
    ref = _LAYOUT_CACHE["key"]
    key_ok = ref is not None and ref[0]() is doc_start and ref[1] == doc_start._version
    if not key_ok:
        _LAYOUT_CACHE["key"] = (weakref.ref(doc_start), doc_start._version)
        _LAYOUT_CACHE["layouts"] = {}
    layouts = _LAYOUT_CACHE["layouts"]
    if kind not in layouts:
        layouts[kind] = _make_layout(doc_start, kind)
    return layouts[kind]


def _make_layout(doc_start: torch.Tensor, kind: str):
    s, b = doc_start.shape
    starts = doc_start.t().clone()  # [b, s]
    starts[:, 0] = True
    if kind == "varlen":
        # Every document of every row is one sequence of the flattened [b * s] token stream.
        first = torch.nonzero(starts.reshape(-1)).flatten()
        cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
        return cu, int((cu[1:] - cu[:-1]).max())
    segment = torch.cumsum(starts, dim=1)  # [b, s]: document number of each token
    if kind == "dense":
        causal = torch.ones(s, s, dtype=torch.bool, device=doc_start.device).tril()
        return ((segment.unsqueeze(2) == segment.unsqueeze(1)) & causal).unsqueeze(1)
    if kind == "block":
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(batch, head, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (segment[batch, q_idx] == segment[batch, kv_idx])

        return create_block_mask(document_causal, b, None, s, s, device=doc_start.device)
    raise ValueError(f"unknown document layout {kind!r}")


class LFAAttention(nn.Module):
    """Yuan 2.0 attention with a pluggable filter and core attention (yuanlfa.model.registry).

    ``qk_proj`` is the fused per-head projection: its output viewed as [.., heads, 2 * head_dim]
    holds [q_head; k_head] for each head. ``lf_gate`` is the filter (``model.filter``; None for
    none), ``core`` the core attention (``model.attention``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.backend = cfg.attention_backend
        self.reset_filter = cfg.lfa_reset_at_doc_start
        self.document_mask = cfg.document_attention
        self.lf_gate = build_component("filter", cfg)
        self.qk_proj = nn.Linear(h, 2 * h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.core = build_component("attention", cfg)
        # Set by the decoder layer and the tp plan: which layer and which global heads this
        # module computes, for the layout-free attention-dropout masks.
        self.layer_id = 0
        self.head_offset = 0

    def core_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dropout: DropoutKey | None = None,
    ) -> torch.Tensor:
        """The core attention alone (a method so selective recompute can wrap just this; the
        dropout key is an argument so the recomputed forward draws the same masks)."""
        if dropout is not None:
            layer = LayerDropout(dropout, self.layer_id, self.head_offset)
            out = self.core(q, k, v, doc_start, dropout=layer)
        else:
            out = self.core(q, k, v, doc_start)
        if not isinstance(out, torch.Tensor) or out.shape != q.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"core attention {type(self.core).__name__} returned {got}; expected the "
                f"queries' shape {tuple(q.shape)} [s, b, heads, head_dim]"
            )
        return out

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        dropout: DropoutKey | None = None,
    ) -> torch.Tensor:
        """x: [s, b, h] (the normed layer input); cos/sin: [s, b, 1, head_dim].

        doc_start: bool [s, b] (the whole sequence), True where position ids restart; used by
        the filter and the attention mask when the config asks for document-aware behaviour.
        dropout: this microbatch's attention-dropout key (training only), else None.
        """
        v = self.v_proj(x)
        # The projections define the sequence length: a sequence-parallel plan feeds this block
        # a shard of x and projections that gather the full sequence.
        s, b = v.shape[:2]
        v = v.view(s, b, self.num_heads, self.head_dim)
        filtered = x
        if self.lf_gate is not None:
            starts = doc_start if self.reset_filter else None
            filtered = apply_filter(self.lf_gate, x, starts, cache)
        qk = self.qk_proj(filtered).view(s, b, self.num_heads, 2 * self.head_dim)
        q, k = qk.split(self.head_dim, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        # Cached decoding continues one document: the plain causal mask is the document mask.
        mask_docs = self.document_mask and cache is None and doc_start is not None
        starts = doc_start if mask_docs else None
        out = self.core_attention(q, k, v, starts, dropout)  # [s, b, heads, d]
        return self.o_proj(out.reshape(s, b, self.num_heads * self.head_dim))


def apply_filter(
    module: nn.Module,
    x: torch.Tensor,
    doc_start: torch.Tensor | None,
    cache: LayerCache | None = None,
) -> torch.Tensor:
    """Run a filter on x [s, b, h] -> [s, b, h], continuing the cached sequence when decoding.

    LFA carries its (x_{t-1}, y_{t-1}) state; any other filter gets its last ``receptive_field``
    inputs prepended (all of them for None), the outputs for those rows dropped.
    """
    if isinstance(module, LocalizedFiltering):
        out, state = module(x, state=cache.lfa if cache is not None else None, doc_start=doc_start)
        if cache is not None:
            cache.lfa = state
        return out
    past = cache.filter_inputs if cache is not None else None
    if past is None:
        out = module(x, doc_start=doc_start)
        inputs, starts = x, doc_start
    else:
        inputs = torch.cat((past, x))
        starts = None
        if doc_start is not None:
            before = cache.filter_starts
            if before is None:
                before = torch.zeros(past.shape[:2], dtype=torch.bool, device=x.device)
            starts = torch.cat((before, doc_start))
        out = module(inputs, doc_start=starts)[past.shape[0] :]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"filter {type(module).__name__} returned {got}; expected the input's shape "
            f"{tuple(x.shape)} [s, b, h]"
        )
    if cache is not None:
        keep = module.receptive_field
        if keep is None or keep > 0:
            start = 0 if keep is None else max(inputs.shape[0] - keep, 0)
            cache.filter_inputs = inputs[start:]
            cache.filter_starts = starts[start:] if starts is not None else None
    return out
