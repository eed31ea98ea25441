"""SentencePiece tokenizers: loading a model file (Yuan 2.0's tokenizer is one) and training a
small one on a local corpus.

Yuan 2.0's special tokens (``<eod>``, ``<sep>``, ``<pad>`` and the three FIM sentinels) are looked
up as pieces of the model; a model that lacks some of them gets them appended after its last
piece, so every tokenizer offers the same specials. Models trained here carry them as
user-defined pieces.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from yuanlfa.data.indexed_dataset import DataError
from yuanlfa.data.special_tokens import SPECIAL_TOKENS, SpecialTokens, resolve_specials


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise DataError(
            "SentencePiece tokenizers need the sentencepiece package: pip install sentencepiece "
            '(or pip install -e ".[tokenizers]")'
        ) from None
    return sentencepiece


class SentencePieceTokenizer(SpecialTokens):
    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise DataError(
                f"SentencePiece model {path} not found; train one with yuanlfa-train-tokenizer "
                "or give the path of a .model file"
            )
        spm = _sentencepiece()
        data = path.read_bytes()
        hint = "give the .model file written by SentencePiece or yuanlfa-train-tokenizer"
        if not data:
            raise DataError(f"{path} is empty, not a SentencePiece model; {hint}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path} is not a SentencePiece model ({first}); {hint}") from None
        # Some bytes parse as an empty model, which sentencepiece reports as "not initialized"
        # and then crashes on (a segfault in unk_id/id_to_piece): refuse it here.
        if self._sp.get_piece_size() < 1:
            raise DataError(f"{path} holds no SentencePiece pieces, not a model; {hint}")
        self.path = path
        # The data cache is keyed by the model's content, not its path.
        self.name = f"spm-{hashlib.sha1(data).hexdigest()[:12]}"
        self._pieces = self._sp.get_piece_size()
        unk = self._sp.unk_id()

        def piece(token: str) -> int | None:
            found = self._sp.piece_to_id(token)
            return found if found != unk or token == self._sp.id_to_piece(unk) else None

        self._special = resolve_specials(piece, self._pieces)
        self._appended = {i: t for t, i in self._special.items() if i >= self._pieces}

    @property
    def vocab_size(self) -> int:
        return self._pieces + len(self._appended)

    def token_to_id(self, name: str) -> int:
        if name in self._special:
            return self._special[name]
        piece = self._sp.piece_to_id(name)
        if piece == self._sp.unk_id():
            raise DataError(f"{self.path}: no token {name!r}")
        return piece

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens appear as their names."""
        out: list[str] = []
        run: list[int] = []
        specials = {i: t for t, i in self._special.items()}
        for raw in ids:
            t = int(raw)
            if not 0 <= t < self.vocab_size:
                top = self.vocab_size - 1
                raise DataError(f"token id {t} is outside the vocabulary (0..{top})")
            if t in specials:
                out.append(self._sp.decode(run))
                run = []
                out.append(specials[t])
            else:
                run.append(t)
        out.append(self._sp.decode(run))
        return "".join(out)


def train_sentencepiece(
    texts: Iterator[str],
    output_prefix: str | os.PathLike[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    seed: int = 1234,
    force: bool = False,
) -> Path:
    """Train a SentencePiece model on ``texts`` (one string per document) and write
    ``output_prefix.model`` and ``.vocab`` atomically. Yuan 2.0's specials are user-defined
    pieces; digits are split and bytes fall back, as in Yuan's and LLaMA's tokenizers."""
    spm = _sentencepiece()
    out = Path(f"{output_prefix}.model")
    if out.exists() and not force:
        raise DataError(f"{out} exists; choose another --output-prefix or pass --force")
    if vocab_size < len(SPECIAL_TOKENS) + 260:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: byte fallback needs 256 pieces plus the "
            f"{len(SPECIAL_TOKENS)} specials and a few more"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".spm-train-") as tmp:
        lines = Path(tmp) / "input.txt"
        count = 0
        with open(lines, "w", encoding="utf-8") as f:
            for text in texts:
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        count += 1
        if count == 0:
            raise DataError("the tokenizer input holds no text")
        prefix = Path(tmp) / "model"
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(seed)  # the sentence sampling: same model every time
        try:
            spm.SentencePieceTrainer.train(
                input=str(lines),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                user_defined_symbols=list(SPECIAL_TOKENS),
                byte_fallback=True,
                split_digits=True,
                # Code needs its whitespace: no NFKC, no collapsing of spaces, and runs of spaces
                # (indentation) may be pieces. Newlines are not in the training lines (one line
                # per sentence); byte fallback encodes them.
                normalization_rule_name="identity",
                add_dummy_prefix=False,  # exact round trips of any substring (FIM cuts text)
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=1_000_000,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise DataError(f"SentencePiece training failed: {exc}") from None
        for ext in (".vocab", ".model"):  # .model last: its presence means complete
            os.replace(f"{prefix}{ext}", f"{output_prefix}{ext}")
    return out
