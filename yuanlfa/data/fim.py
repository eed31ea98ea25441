"""Fill-in-the-middle (FIM) transform of packed samples, as Yuan 2.0 and Megatron/StarCoder do it.

A document is cut at two character positions into ``prefix + middle + suffix`` and rewritten so
that a left-to-right model learns to produce the middle after seeing both sides. With the
sentinel ids ``PRE``, ``SUF``, ``MID`` of :class:`FIMConfig` and ``enc`` the tokenizer's
``encode`` applied to each piece on its own, the two layouts are::

    PSM:  PRE enc(prefix) SUF enc(suffix) MID enc(middle)
    SPM:  PRE SUF enc(suffix) MID enc(prefix) enc(middle)

(SPM is the variant of the FIM paper's appendix that Megatron and StarCoder call SPM: the
prefix moves after ``MID`` so that prefix and middle are one contiguous text.) Both are undone
by ``dec(between PRE and SUF) + dec(after MID) + dec(between SUF and MID)``, see
:func:`undo_fim`. A PSM document with an empty prefix is token for token an SPM document, and
both formulas give the same text for it. The inverse is exact whenever ``dec(enc(s)) == s`` and
``dec(a + b) == dec(a) + dec(b)``, as for the byte tokenizer.

Which documents are rewritten, and where they are cut, depends only on ``(seed, epoch,
sample_index, doc_position)`` (see :func:`document_seed`): never on global random state or on
the order in which samples are asked for. So a sample is the same in every process, with any
number of dataloader workers, and after a resume.

:func:`apply_fim` works on one packed sample of ``seq_length + 1`` tokens: it splits at EOD
tokens, rewrites each document on its own and keeps the length fixed (truncating the end, or
padding the end with a zero loss mask). The documents cut by the sample's edges are treated as
documents of their own, as in Megatron. A document is left as it is when it is empty, when it
holds a sentinel id, or when ``enc(dec(ids)) != ids`` (e.g. a fragment cut inside a multi-byte
UTF-8 character): rewriting it would change its text, not only its order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from yuanlfa.data.indexed_dataset import DataError

__all__ = [
    "FIMConfig",
    "FIMTokenizer",
    "apply_fim",
    "document_rng",
    "document_seed",
    "encode_fim",
    "fim_document",
    "fim_layout",
    "fit_to_length",
    "undo_fim",
]


class FIMTokenizer(Protocol):
    """All FIM needs from a tokenizer (``ByteTokenizer`` is one)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a token id is always a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True, kw_only=True)
class FIMConfig:
    """FIM settings. Keyword-only: five integer ids in a row are too easy to swap by position.

    ``rate`` is the probability that a document is rewritten, ``spm_rate`` the probability that
    a rewritten document uses SPM rather than PSM. ``pad_id`` fills samples that FIM made
    shorter; None pads with ``eod_id`` (padding is masked out of the loss either way).
    """

    prefix_id: int
    middle_id: int
    suffix_id: int
    eod_id: int
    pad_id: int | None = None
    rate: float = 0.5
    spm_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(
                value, (bool, np.bool_)
            )
            if not ok or not 0.0 <= float(value) <= 1.0:  # also rejects NaN
                raise DataError(
                    f"FIMConfig.{name} must be a probability in [0, 1], got {value!r}; "
                    f"set {name} to a number between 0 and 1"
                )
        ids = {"prefix_id": self.prefix_id, "middle_id": self.middle_id}
        ids |= {"suffix_id": self.suffix_id, "eod_id": self.eod_id}
        if self.pad_id is not None:
            ids["pad_id"] = self.pad_id
        for name, value in ids.items():
            if not _is_int(value) or value < 0:
                raise DataError(
                    f"FIMConfig.{name} must be a non-negative int token id, got {value!r}; "
                    "take it from the tokenizer (e.g. FIMConfig.from_tokenizer(tokenizer))"
                )
        # The sentinels and EOD must be told apart to split samples and to undo the layout.
        # pad_id may equal eod_id (that is what None means) but not a sentinel.
        seen: dict[int, str] = {}
        for name in ("prefix_id", "middle_id", "suffix_id", "eod_id", "pad_id"):
            value = ids.get(name)
            if value is None or (name == "pad_id" and value == self.eod_id):
                continue
            if int(value) in seen:
                raise DataError(
                    f"FIMConfig.{name} ({value}) equals {seen[int(value)]}; prefix_id, "
                    "middle_id, suffix_id and eod_id must be four different ids, and pad_id "
                    "must not be a sentinel"
                )
            seen[int(value)] = name

    @classmethod
    def from_tokenizer(
        cls, tokenizer: object, *, rate: float = 0.5, spm_rate: float = 0.5
    ) -> FIMConfig:
        """Ids from a tokenizer's ``fim_prefix``, ``fim_middle``, ``fim_suffix``, ``eod`` and
        (if it has one) ``pad`` attributes, as ``ByteTokenizer`` provides them."""
        needed = ("fim_prefix", "fim_middle", "fim_suffix", "eod")
        missing = [a for a in needed if not hasattr(tokenizer, a)]
        if missing:
            raise DataError(
                f"tokenizer {type(tokenizer).__name__} has no {', '.join(missing)}; build "
                "FIMConfig(prefix_id=..., middle_id=..., suffix_id=..., eod_id=...) by hand"
            )
        return cls(
            prefix_id=tokenizer.fim_prefix,  # type: ignore[attr-defined]
            middle_id=tokenizer.fim_middle,  # type: ignore[attr-defined]
            suffix_id=tokenizer.fim_suffix,  # type: ignore[attr-defined]
            eod_id=tokenizer.eod,  # type: ignore[attr-defined]
            pad_id=getattr(tokenizer, "pad", None),
            rate=rate,
            spm_rate=spm_rate,
        )

    @property
    def sentinels(self) -> tuple[int, int, int]:
        return (self.prefix_id, self.middle_id, self.suffix_id)


# ---------------------------------------------------------------------------------------------
# Per-document randomness

_MASK64 = (1 << 64) - 1
# Domain tag ("FIM-RNG1" in ASCII): other users of the same seed get unrelated streams.
_STREAM_TAG = 0x46494D2D524E4731


def _splitmix64(z: int) -> int:
    """One SplitMix64 step (Steele et al. 2014): a bijection on 64-bit ints that mixes well."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def document_seed(seed: int, epoch: int, sample_index: int, doc_position: int) -> int:
    """The 64-bit seed of one document: ``h = TAG; h = splitmix64(h ^ v)`` for ``v`` in
    ``(seed, epoch, sample_index, doc_position)``, with ``TAG = 0x46494D2D524E4731``.

    Plain integer arithmetic, so it never changes with numpy or Python versions (``hash()``
    would change with PYTHONHASHSEED). Each step is a bijection, so two tuples that differ in
    one value never collide.
    """
    h = _STREAM_TAG
    for name, value in (
        ("seed", seed),
        ("epoch", epoch),
        ("sample_index", sample_index),
        ("doc_position", doc_position),
    ):
        if not _is_int(value) or not 0 <= value <= _MASK64:
            raise DataError(f"{name} must be an int in [0, 2**64), got {value!r}")
        h = _splitmix64(h ^ int(value))
    return h


def _seed_words(h: int) -> list[int]:
    return [h & 0xFFFFFFFF, h >> 32]


def document_rng(
    seed: int, epoch: int, sample_index: int, doc_position: int
) -> np.random.RandomState:
    """A RandomState seeded (by array, all 64 bits) from :func:`document_seed`.

    RandomState rather than Generator: numpy freezes its streams, so a seed means the same cuts
    in every numpy version.
    """
    return np.random.RandomState(
        _seed_words(document_seed(seed, epoch, sample_index, doc_position))
    )


# ---------------------------------------------------------------------------------------------
# One document


def _as_tokens(ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{what} must be a 1-D sequence of int token ids, got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def _encode(tokenizer: FIMTokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64).reshape(-1)


def encode_fim(
    text: str, lo: int, hi: int, *, spm: bool, cfg: FIMConfig, tokenizer: FIMTokenizer
) -> np.ndarray:
    """Token ids of ``text`` cut at character positions ``lo <= hi`` in the PSM or SPM layout
    (see the module docstring)."""
    if not 0 <= lo <= hi <= len(text):
        raise DataError(f"cut points must satisfy 0 <= lo <= hi <= {len(text)}, got {lo}, {hi}")
    # Each piece is tokenized on its own: the model must learn to continue from a piece edge
    # that falls inside a word, which is what it will see at inference time.
    prefix, middle, suffix = (_encode(tokenizer, s) for s in (text[:lo], text[lo:hi], text[hi:]))
    pre, mid, suf = (np.array([i], dtype=np.int64) for i in cfg.sentinels)
    if spm:
        parts = [pre, suf, suffix, mid, prefix, middle]
    else:
        parts = [pre, prefix, suf, suffix, mid, middle]
    return np.concatenate(parts)


def _lossless_text(doc: np.ndarray, cfg: FIMConfig, tokenizer: FIMTokenizer) -> str | None:
    """The text of ``doc``, or None when rewriting it would not preserve its content."""
    # A sentinel (or an EOD, possible when fim_document is called directly) inside a document
    # would make the layout ambiguous for the model and for undo_fim.
    if np.isin(doc, (*cfg.sentinels, cfg.eod_id)).any():
        return None
    text = tokenizer.decode(doc.tolist())
    # Lossy decoding (a fragment cut inside a UTF-8 character decodes to U+FFFD, a special
    # token to its name) would silently change the training text.
    if not np.array_equal(_encode(tokenizer, text), doc):
        return None
    return text


def _draw_cuts(rng: np.random.RandomState, num_chars: int) -> tuple[int, int]:
    # Two independent uniform positions in [0, num_chars], sorted: Megatron's distribution, in
    # which an empty prefix, middle or suffix is possible.
    a, b = (int(x) for x in rng.randint(0, num_chars + 1, size=2))
    return min(a, b), max(a, b)


def fim_document(
    ids: Sequence[int] | np.ndarray,
    cfg: FIMConfig,
    tokenizer: FIMTokenizer,
    rng: np.random.RandomState,
) -> np.ndarray:
    """One document (no EOD) rewritten with probability ``cfg.rate``, as int64 ids.

    Draws, in this order: a uniform for "rewrite?" (``< rate``), a uniform for "SPM?"
    (``< spm_rate``), then the two cut points. Empty documents and documents whose text does
    not survive ``encode(decode(ids))`` are returned unchanged.
    """
    doc = _as_tokens(ids, "ids")
    if doc.size == 0:
        # Nothing to infill; the sentinels alone would only teach "MID is followed by EOD".
        return doc
    # rate 1 always passes (random_sample() < 1) and rate 0 never does.
    if rng.random_sample() >= cfg.rate:
        return doc
    spm = bool(rng.random_sample() < cfg.spm_rate)
    text = _lossless_text(doc, cfg, tokenizer)
    if text is None:
        return doc
    lo, hi = _draw_cuts(rng, len(text))
    return encode_fim(text, lo, hi, spm=spm, cfg=cfg, tokenizer=tokenizer)


def _sentinel_positions(doc: np.ndarray, cfg: FIMConfig) -> tuple[int, int]:
    """Positions of SUF and MID in a well-formed FIM document; raises otherwise."""
    hint = (
        "; pass one document (the tokens between two EODs) written by fim_document or "
        "apply_fim (the last document of a truncated sample may have lost its end)"
    )
    if np.any(doc == cfg.eod_id):
        raise DataError("not a FIM document: it holds eod_id" + hint)
    counts = {
        name: int(np.count_nonzero(doc == i))
        for name, i in zip(("prefix_id", "middle_id", "suffix_id"), cfg.sentinels)
    }
    if any(c != 1 for c in counts.values()):
        raise DataError(f"not a FIM document: each sentinel must occur once, found {counts}" + hint)
    if doc[0] != cfg.prefix_id:
        raise DataError("not a FIM document: it does not start with prefix_id" + hint)
    suf = int(np.flatnonzero(doc == cfg.suffix_id)[0])
    mid = int(np.flatnonzero(doc == cfg.middle_id)[0])
    if mid < suf:
        raise DataError(
            f"not a FIM document: middle_id (at {mid}) precedes suffix_id ({suf})" + hint
        )
    return suf, mid


def fim_layout(ids: Sequence[int] | np.ndarray, cfg: FIMConfig) -> Literal["psm", "spm"] | None:
    """The layout of a FIM document ("psm" or "spm"); None for a document without sentinels.

    A PSM document with an empty prefix is identical to an SPM one and is reported as "spm".
    """
    doc = _as_tokens(ids, "ids")
    if not np.isin(doc, cfg.sentinels).any():
        return None
    suf, _ = _sentinel_positions(doc, cfg)
    return "spm" if suf == 1 else "psm"


def undo_fim(ids: Sequence[int] | np.ndarray, cfg: FIMConfig, tokenizer: FIMTokenizer) -> str:
    """The original text of one FIM document (PSM or SPM)."""
    doc = _as_tokens(ids, "ids")
    suf, mid = _sentinel_positions(doc, cfg)

    def dec(part: np.ndarray) -> str:
        return tokenizer.decode(part.tolist())

    # PSM: prefix + middle + suffix. SPM: the first part is empty and "after MID" is already
    # prefix + middle; one formula serves both.
    return dec(doc[1:suf]) + dec(doc[mid + 1 :]) + dec(doc[suf + 1 : mid])


# ---------------------------------------------------------------------------------------------
# Packed samples


def fit_to_length(tokens: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokens`` cut or padded at the end to ``length``, and a float32 mask that is 0 on the
    padding."""
    tokens = _as_tokens(tokens, "tokens")
    mask = np.ones(length, dtype=np.float32)
    if len(tokens) >= length:
        return tokens[:length].copy(), mask
    out = np.full(length, pad_id, dtype=np.int64)
    out[: len(tokens)] = tokens
    mask[len(tokens) :] = 0.0
    return out, mask


def apply_fim(
    sample: Sequence[int] | np.ndarray,
    cfg: FIMConfig,
    tokenizer: FIMTokenizer,
    *,
    seed: int,
    sample_index: int,
    epoch: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """FIM on every document of one packed sample; returns ``(tokens int64, loss_mask float32)``
    of the input's length.

    Documents are the runs between EOD tokens, numbered from 0 at the sample start (empty runs
    count), and document ``k`` draws from ``document_rng(seed, epoch, sample_index, k)``.
    ``sample_index`` is the index the dataset was asked for. The EOD tokens stay between the
    documents. A longer result is truncated at the end; a shorter one is padded at the end with
    ``pad_id`` (``eod_id`` if None) where ``loss_mask`` is 0. ``loss_mask[i]`` belongs to token
    ``i``: for labels ``tokens[1:]`` use ``loss_mask[1:]``.
    """
    tokens = _as_tokens(sample, "sample")
    n = len(tokens)
    if cfg.rate == 0:
        return tokens.copy(), np.ones(n, dtype=np.float32)
    ends = np.flatnonzero(tokens == cfg.eod_id).tolist() + [n]
    eod = np.array([cfg.eod_id], dtype=np.int64)
    # One RandomState reseeded per document: seeding fixes its whole state, so this is the
    # same as a fresh document_rng() and much cheaper than constructing one each time.
    rng = np.random.RandomState(0)
    pieces: list[np.ndarray] = []
    start = 0
    for position, end in enumerate(ends):
        doc = tokens[start:end]
        if doc.size:
            rng.seed(_seed_words(document_seed(seed, epoch, sample_index, position)))
            pieces.append(fim_document(doc, cfg, tokenizer, rng))
        if end < n:
            pieces.append(eod)
        start = end + 1
    pad = cfg.eod_id if cfg.pad_id is None else cfg.pad_id
    out = np.concatenate(pieces) if pieces else tokens[:0]
    return fit_to_length(out, n, pad)
