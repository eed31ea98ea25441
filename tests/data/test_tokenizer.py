from __future__ import annotations

import numpy as np
import pytest

from yuanlfa.data import ByteTokenizer, build_tokenizer, pad_vocab_size

SPECIALS = ["<eod>", "<pad>", "<sep>", "<FIM_PREFIX>", "<FIM_MIDDLE>", "<FIM_SUFFIX>"]
TEXT = "héllo wörld — 你好, мир 🙂\n\ttabs & \x00 nul"


def test_ids_are_utf8_bytes():
    tok = ByteTokenizer()
    assert tok.encode(TEXT) == [b for b in TEXT.encode("utf-8")]
    arr = tok.encode_np(TEXT)
    assert arr.dtype == np.int32
    assert arr.tolist() == tok.encode(TEXT)
    assert tok.encode("") == [] and tok.encode_np("").size == 0


def test_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(np.array(tok.encode(TEXT), dtype=np.uint16)) == TEXT


def test_specials_and_vocab():
    tok = ByteTokenizer()
    assert tok.vocab_size == 262
    assert tok.name == "byte"
    for i, name in enumerate(SPECIALS):
        assert tok.token_to_id(name) == 256 + i
    assert (tok.eod, tok.pad) == (256, 257)
    ids = tok.encode("a") + [tok.eod] + tok.encode("ü") + [tok.token_to_id("<FIM_SUFFIX>")]
    assert tok.decode(ids) == "a<eod>ü<FIM_SUFFIX>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.token_to_id("<bos>")
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([262])


def test_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    # A multi-byte character cut by a special token cannot be decoded across it.
    euro = list("€".encode())
    assert tok.decode(euro[:2] + [tok.eod] + euro[2:]) == "\ufffd<eod>\ufffd"


def test_pad_vocab_size():
    assert pad_vocab_size(262) == 384
    assert pad_vocab_size(256) == 256
    assert pad_vocab_size(134953) == 135040  # Yuan 2.0's released vocabulary
    # The same padding for every tp dividing the multiple (layout-independent models) ...
    assert pad_vocab_size(134953, tp=8) == 135040
    assert pad_vocab_size(1, multiple=64, tp=2) == 64
    # ... and divisibility by any other tp.
    assert pad_vocab_size(262, tp=3) == 384 and pad_vocab_size(400, tp=3) == 768
    with pytest.raises(ValueError):
        pad_vocab_size(0)


def test_build_tokenizer():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'; use byte, sentencepiece:"):
        build_tokenizer("gpt2")
