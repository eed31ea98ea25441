"""Tokenizers: the built-in byte tokenizer (UTF-8 bytes, no vocabulary file), SentencePiece
models (``spm.py``) and Hugging Face tokenizer files (``hf_tokenizer.py``), chosen by a spec."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from yuanlfa.data.indexed_dataset import DataError


class Tokenizer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# The specials every tokenizer offers (the properties of SpecialTokens). The order is part of
# the format of the byte tokenizer (ids 256..261) and of Hugging Face tokenizers that lack them:
# token files written with these ids must stay readable.
SPECIAL_TOKENS = ("<eod>", "<pad>", "<sep>", "<FIM_PREFIX>", "<FIM_MIDDLE>", "<FIM_SUFFIX>")

# Yuan 2.0's specials in the order its code adds them to its SentencePiece model (``<eod>`` as
# the eos token, then ``add_tokens([...], special_tokens=True)``): a SentencePiece model that
# lacks some gets them appended in this order, which gives Yuan's own ids (``<mask>`` 134953 ..
# ``<FIM_MIDDLE>`` 134957 for its released model) and, for any other model, the ids Yuan's
# procedure would give it. Written in text, each is one id.
YUAN_SPECIAL_TOKENS = (
    "<eod>",
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
)


def resolve_specials(
    lookup: Callable[[str], int | None], size: int, tokens: tuple[str, ...] = SPECIAL_TOKENS
) -> dict[str, int]:
    """Id of each of ``tokens``: ``lookup(token)`` where the vocabulary has it, else the next id
    after the ``size`` ids of the vocabulary, in the order of ``tokens`` (so every tokenizer
    offers the same specials)."""
    out: dict[str, int] = {}
    for token in tokens:
        found = lookup(token)
        out[token] = found if found is not None else size + sum(v >= size for v in out.values())
    return out


class SpecialTokens:
    """The named special-token ids of a tokenizer whose ``_special`` maps names to ids."""

    _special: dict[str, int]

    @property
    def eod(self) -> int:
        return self._special["<eod>"]

    @property
    def pad(self) -> int:
        return self._special["<pad>"]

    @property
    def sep(self) -> int:
        return self._special["<sep>"]

    @property
    def fim_prefix(self) -> int:
        return self._special["<FIM_PREFIX>"]

    @property
    def fim_middle(self) -> int:
        return self._special["<FIM_MIDDLE>"]

    @property
    def fim_suffix(self) -> int:
        return self._special["<FIM_SUFFIX>"]


class ByteTokenizer(SpecialTokens):
    """Ids 0..255 are raw UTF-8 bytes; the specials follow from 256 in SPECIAL_TOKENS order."""

    name = "byte"

    def __init__(self) -> None:
        self._special = resolve_specials(lambda _: None, 256)

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        # Iterating bytes yields ints in C, far faster than per-character work in Python.
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        """Token ids as an int32 array (wide enough to append special tokens)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials appear as their names, invalid UTF-8 as U+FFFD."""
        parts: list[str] = []
        run = bytearray()
        for raw in ids:
            t = int(raw)
            if 0 <= t < 256:
                run.append(t)
                continue
            if not 256 <= t < self.vocab_size:
                raise DataError(
                    f"token id {t} is outside the byte vocabulary (0..{self.vocab_size - 1})"
                )
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(SPECIAL_TOKENS[t - 256])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, name: str) -> int:
        if name not in self._special:
            raise DataError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special[name]


def build_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from its spec (``data.tokenizer``, ``yuanlfa-preprocess --tokenizer``):
    ``byte``; ``sentencepiece:PATH`` (a .model file, e.g. Yuan 2.0's, or one written by
    yuanlfa-train-tokenizer); ``huggingface:PATH`` (a directory with tokenizer.json)."""
    kind, _, path = spec.partition(":")
    if kind == "byte" and not path:
        return ByteTokenizer()
    if kind == "sentencepiece" and path:
        from yuanlfa.data.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    if kind == "huggingface" and path:
        from yuanlfa.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    raise DataError(
        f"unknown tokenizer {spec!r}; use byte, sentencepiece:PATH/TO/tokenizer.model or "
        "huggingface:PATH/TO/DIR"
    )


def pad_vocab_size(vocab_size: int, multiple: int = 128, tp: int = 1) -> int:
    """Round up to a multiple of lcm(multiple, tp): divisible by tp, and the same for every tp
    that divides ``multiple`` (so the model does not change with the layout; see
    ``yuanlfa.config.resolve``)."""
    if vocab_size < 1 or multiple < 1 or tp < 1:
        raise DataError(
            f"pad_vocab_size needs positive numbers, got vocab_size={vocab_size}, "
            f"multiple={multiple}, tp={tp}"
        )
    step = math.lcm(multiple, tp)
    return math.ceil(vocab_size / step) * step
