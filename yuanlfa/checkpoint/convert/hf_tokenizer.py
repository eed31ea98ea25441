"""The tokenizer of a run, as a Hugging Face export carries it: its special-token ids for
``config.json`` and, for a SentencePiece model, the files transformers loads it from.

The files reproduce Yuan 2.0's procedure (its ``megatron/tokenizer/tokenizer.py``):
``LlamaTokenizer`` in legacy mode, no bos/eos added, ``<eod>`` the eos token, and Yuan's specials
added as special tokens at the ids the run used (``added_tokens_decoder``), so that
``LlamaTokenizer.from_pretrained(export_dir)`` encodes every text as the run did.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.data.special_tokens import YUAN_SPECIAL_TOKENS
from yuanlfa.data.tokenizer import build_tokenizer

# Yuan 2.0's released ids (its config.json files), used when a checkpoint records no tokenizer.
YUAN_EOD, YUAN_SEP = 77185, 77187


@dataclass(frozen=True)
class RunTokenizer:
    """Special ids of the run's tokenizer and, for SentencePiece, its model file and added
    tokens (name -> id)."""

    spec: str | None
    eod: int
    sep: int
    pad: int
    bos: int | None
    model_file: Path | None
    added: tuple[tuple[str, int], ...]


def run_tokenizer(spec: str | None) -> RunTokenizer:
    """The run's tokenizer from its ``data.tokenizer`` spec; ``None``: unknown (an imported
    checkpoint never trained here), described by Yuan 2.0's released ids."""
    if spec is None:
        return RunTokenizer(None, YUAN_EOD, YUAN_SEP, YUAN_EOD, None, None, ())
    try:
        tok = build_tokenizer(spec)
    except Exception as exc:  # DataError, missing packages: name the fix, before any writing
        raise CheckpointError(
            f"the run's tokenizer {spec!r} cannot be loaded ({exc}); give it with "
            "tokenizer='sentencepiece:PATH' (yuanlfa-reshard --tokenizer)"
        ) from None
    kind, _, path = spec.partition(":")
    if kind != "sentencepiece":
        return RunTokenizer(spec, tok.eod, tok.sep, tok.pad, None, None, ())
    added = tuple((t, tok.token_to_id(t)) for t in YUAN_SPECIAL_TOKENS)
    try:
        bos = tok.token_to_id("<s>")
    except Exception:
        bos = None
    return RunTokenizer(spec, tok.eod, tok.sep, tok.pad, bos, Path(path), added)


def _token(content: str) -> dict:
    # Matched as written (no normalization) and nothing stripped around it, as transformers
    # 4.34.1 and later match Yuan's add_tokens(..., special_tokens=True).
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_tokenizer_files(tok: RunTokenizer, out: Path, max_length: int) -> None:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json in ``out`` (nothing
    for a tokenizer that is not SentencePiece)."""
    if tok.model_file is None:
        return
    shutil.copyfile(tok.model_file, out / "tokenizer.model")
    decoder = {str(i): _token(t) for t, i in tok.added}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "bos_token": "<s>" if tok.bos is not None else None,
        "eos_token": "<eod>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": [t for t, _ in tok.added if t not in ("<eod>", "<pad>")],
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "sp_model_kwargs": {},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    special_map = {k: config[k] for k in names if config[k] is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
