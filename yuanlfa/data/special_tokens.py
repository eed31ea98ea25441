"""What every tokenizer offers: the :class:`Tokenizer` protocol and the special tokens (their
names, their ids in a vocabulary that may lack them), shared by the byte, SentencePiece and
Hugging Face tokenizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol


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
