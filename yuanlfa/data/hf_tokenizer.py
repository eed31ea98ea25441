"""Hugging Face ``tokenizers`` tokenizers from a local directory (``tokenizer.json``), e.g. the one
shipped next to a Hugging Face model. No network access: only local files are read."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from yuanlfa.data.indexed_dataset import DataError
from yuanlfa.data.special_tokens import SpecialTokens, resolve_specials

# Where an end-of-document token hides when the vocabulary has no <eod> (LLaMA-style, GPT-2).
EOD_FALLBACKS = ("<eod>", "</s>", "<|endoftext|>", "<|end_of_text|>")


class HFTokenizer(SpecialTokens):
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        root = Path(directory)
        path = root / "tokenizer.json" if root.is_dir() else root
        if not path.is_file():
            raise DataError(
                f"{root}: no tokenizer.json; give a directory holding a Hugging Face fast "
                "tokenizer (tokenizer.json) or the file itself"
            )
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise DataError(
                "Hugging Face tokenizers need the tokenizers package: pip install tokenizers "
                '(or pip install -e ".[tokenizers]")'
            ) from None
        data = path.read_bytes()
        try:
            self._tok = _Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # the Rust side raises its own exception type
            raise DataError(f"{path} is not a Hugging Face tokenizer file ({exc})") from None
        self.path = path
        self.name = f"hf-{hashlib.sha1(data).hexdigest()[:12]}"
        self._size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = None
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("eos_token")
            eos = value.get("content") if isinstance(value, dict) else value
        # <eod>: the vocabulary's own, else its eos token, else a common end-of-text token.
        eod_names = ["<eod>", *([eos] if eos else []), *EOD_FALLBACKS]

        def lookup(token: str) -> int | None:
            names = eod_names if token == "<eod>" else [token]
            return next((i for n in names if (i := self._tok.token_to_id(n)) is not None), None)

        self._special = resolve_specials(lookup, self._size)
        self._appended = {i: t for t, i in self._special.items() if i >= self._size}

    @property
    def vocab_size(self) -> int:
        return self._size + len(self._appended)

    def token_to_id(self, name: str) -> int:
        if name in self._special:
            return self._special[name]
        found = self._tok.token_to_id(name)
        if found is None:
            raise DataError(f"{self.path}: no token {name!r}")
        return found

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS templates: documents get exactly one <eod> from the preprocessing.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            t = int(raw)
            if not 0 <= t < self.vocab_size:
                top = self.vocab_size - 1
                raise DataError(f"token id {t} is outside the vocabulary (0..{top})")
            if t in self._appended:
                out.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
                out.append(self._appended[t])
            else:
                run.append(t)
        out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)
