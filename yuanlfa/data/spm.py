"""SentencePiece tokenizers: loading a model file (Yuan 2.0's tokenizer is one) and training a
small one on a local corpus.

Encoding follows Yuan 2.0's own procedure (transformers' ``LlamaTokenizer`` in legacy mode with
``eos_token='<eod>'`` and Yuan's special tokens added), so Yuan's released model gives Yuan's ids
for every text: Yuan's specials (YUAN_SPECIAL_TOKENS), and ``<unk>`` and ``<s>`` where the model
has them, written in the text are one id each; the text between them is encoded by SentencePiece
piece by piece, so its dummy ``▁`` prefix (where the model adds one) restarts after each
special; no whitespace around a special is dropped (as transformers 4.34.1 and later do; see
SentencePieceTokenizer's ``strip_around_added`` for the older behaviour). Specials the model lacks
are appended after its last piece in YUAN_SPECIAL_TOKENS order (``<eod>`` first, as transformers
adds the eos token before the others). Models trained here carry them all as user-defined pieces.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from yuanlfa.data.indexed_dataset import DataError
from yuanlfa.data.special_tokens import YUAN_SPECIAL_TOKENS, SpecialTokens, resolve_specials

# LlamaTokenizer's own unk and bos tokens: matched in text too, when the model has them.
_LLAMA_SPECIALS = ("<unk>", "<s>")
# Up to this many pieces of text between specials are encoded one call each; more go in
# one batch call (a batch call costs more for a few short pieces, less for many).
_BATCH_FROM = 8


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
    """A SentencePiece model encoding as Yuan 2.0's procedure does (see the module's doc).

    ``strip_around_added``: whitespace next to the tokens Yuan's code adds with ``add_tokens``
    (YUAN_SPECIAL_TOKENS but ``<eod>``) is dropped (str.rstrip before, str.lstrip after), as
    transformers 4.34.0 and earlier did; 4.34.1 and later keep it, as the default here does.
    Yuan 2.0's released models were trained before 4.34.1 came out (its FastChat guide pins
    4.31.0), so their data may have been tokenized the stripping way.
    """

    def __init__(
        self, model_file: str | os.PathLike[str], *, strip_around_added: bool = False
    ) -> None:
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
        # The data cache is keyed by the model's content, not its path; "spm2": the ids of
        # specials written in text changed (one id each, as in Yuan 2.0), so caches made by the
        # older encoding are not reused.
        digest = hashlib.sha1(data).hexdigest()[:12]
        self.name = f"spm2-{digest}" + ("-strip" if strip_around_added else "")
        self._pieces = self._sp.get_piece_size()
        self._special = resolve_specials(self._piece, self._pieces, YUAN_SPECIAL_TOKENS)
        self._appended = {i: t for t, i in self._special.items() if i >= self._pieces}
        # Every token matched in text before SentencePiece runs, and the names ids decode to.
        matched = dict(self._special)
        for token in _LLAMA_SPECIALS:
            found = self._piece(token)
            if found is not None:
                matched[token] = found
        self._matched = matched
        self._names = {i: t for t, i in matched.items()}
        # Longest first: a token that begins another must not cut it (none of Yuan's does).
        alternatives = "|".join(re.escape(t) for t in sorted(matched, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})").split
        # <eod> is the eos token (an AddedToken without lstrip/rstrip), never stripped around.
        added = frozenset(t for t in YUAN_SPECIAL_TOKENS if t != "<eod>")
        self._stripping = added if strip_around_added else frozenset()

    def _piece(self, token: str) -> int | None:
        """The id of the piece ``token``, or None when the model has no such piece."""
        found = self._sp.piece_to_id(token)
        unk = self._sp.unk_id()
        return found if found != unk or token == self._sp.id_to_piece(unk) else None

    @property
    def vocab_size(self) -> int:
        return self._pieces + len(self._appended)

    def token_to_id(self, name: str) -> int:
        if name in self._special:
            return self._special[name]
        piece = self._piece(name)
        if piece is None:
            raise DataError(f"{self.path}: no token {name!r}")
        return piece

    def encode(self, text: str) -> list[int]:
        # Every special starts with "<": most texts skip the split.
        parts = self._split(text) if "<" in text else [text]
        if len(parts) == 1:
            return self._sp.encode(text, out_type=int)
        # re.split with a group: text, special, text, ..., text.
        if self._stripping:
            for k in range(1, len(parts), 2):
                if parts[k] in self._stripping:
                    parts[k - 1] = parts[k - 1].rstrip()
                    parts[k + 1] = parts[k + 1].lstrip()
        texts = parts[0::2]
        if len(texts) > _BATCH_FROM:
            encoded = self._sp.encode(texts, out_type=int, num_threads=1)
        else:
            encoded = [self._sp.encode(t, out_type=int) for t in texts]
        out: list[int] = []
        for ids, special in zip(encoded, parts[1::2]):
            out += ids
            out.append(self._matched[special])
        out += encoded[-1]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (and ``<unk>``, ``<s>``) appear as their names."""
        out: list[str] = []
        run: list[int] = []
        specials = self._names
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
    ``output_prefix.model`` and ``.vocab`` atomically. Yuan 2.0's specials
    (YUAN_SPECIAL_TOKENS) are user-defined pieces; digits are split and bytes fall back, as in
    Yuan's and LLaMA's tokenizers."""
    spm = _sentencepiece()
    out = Path(f"{output_prefix}.model")
    if out.exists() and not force:
        raise DataError(f"{out} exists; choose another --output-prefix or pass --force")
    if vocab_size < len(YUAN_SPECIAL_TOKENS) + 260:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: byte fallback needs 256 pieces plus the "
            f"{len(YUAN_SPECIAL_TOKENS)} specials and a few more"
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
                user_defined_symbols=list(YUAN_SPECIAL_TOKENS),
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
