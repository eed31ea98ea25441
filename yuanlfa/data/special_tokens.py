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


# The order is part of the format: token files written with these ids must stay readable.
SPECIAL_TOKENS = ("<eod>", "<pad>", "<sep>", "<FIM_PREFIX>", "<FIM_MIDDLE>", "<FIM_SUFFIX>")


def resolve_specials(lookup: Callable[[str], int | None], size: int) -> dict[str, int]:
    """Id of each of SPECIAL_TOKENS: ``lookup(token)`` where the vocabulary has it, else the next
    id after the ``size`` ids of the vocabulary (so every tokenizer offers the same specials)."""
    out: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
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
