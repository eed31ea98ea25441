"""Fill-in-the-middle: invertibility, observed rates, determinism, packed-sample invariants.

Expected layouts and seeds are built here from the documented formulas (bytes, SplitMix64), not
by calling the code under test. The statistical checks use fixed seeds, so they are
deterministic; their tolerances (4 to 4.5 standard deviations) are what a correct
implementation passes with overwhelming probability for any seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yuanlfa.data import ByteTokenizer
from yuanlfa.data.fim import (
    FIMConfig,
    apply_fim,
    document_rng,
    document_seed,
    encode_fim,
    fim_document,
    fim_layout,
    fit_to_length,
    undo_fim,
)

TOK = ByteTokenizer()
PRE, MID, SUF, EOD, PAD = (
    TOK.fim_prefix,
    TOK.fim_middle,
    TOK.fim_suffix,
    TOK.eod,
    TOK.pad,
)
# One- to four-byte UTF-8 characters, whitespace, NUL and a combining accent.
ALPHABET = list("abcxyz019 .(){}") + ["\n", "\t", "\x00", "é", "ß", "ж", "你", "好", "🙂", "\u0301"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def byte_cfg(rate: float = 0.5, spm_rate: float = 0.5) -> FIMConfig:
    return FIMConfig(
        prefix_id=PRE, middle_id=MID, suffix_id=SUF, eod_id=EOD, pad_id=PAD, rate=rate,
        spm_rate=spm_rate,
    )  # fmt: skip


def random_text(rng: random.Random, max_len: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len)))


def ascii_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghij \n") for _ in range(length))


def split_at(tokens: np.ndarray, eod: int) -> list[np.ndarray]:
    """The runs between EOD tokens (written independently of the module's splitting)."""
    docs, current = [], []
    for t in tokens.tolist():
        if t == eod:
            docs.append(np.array(current, dtype=np.int64))
            current = []
        else:
            current.append(t)
    docs.append(np.array(current, dtype=np.int64))
    return docs


def packed_sample(rng: random.Random, length: int) -> np.ndarray:
    """A window of an EOD-separated document stream, starting and ending anywhere (also inside
    a multi-byte character), like PackedDataset.sample_tokens returns."""
    stream: list[int] = []
    while len(stream) < length + 60:
        stream += TOK.encode(random_text(rng, 70)) + [EOD]
    start = rng.randint(0, 50)
    return np.array(stream[start : start + length], dtype=np.int64)


class RepeatTokenizer:
    """Code points as ids, plus four marker tokens before a character equal to the previous
    one. Cutting between two equal characters drops the markers, so FIM can make a document
    shorter (which never happens with the byte tokenizer) and the padding path runs."""

    MARK = 0x110000
    PRE, MID, SUF, EOD, PAD = range(0x110001, 0x110006)
    COST = 4
    # Special tokens decode to private-use characters that encode back to them (as
    # SentencePiece does with "<eod>"), so only an explicit check keeps them out of FIM.
    PRIVATE = 0xE000

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, ch in enumerate(text):
            if i and text[i - 1] == ch:
                out += [self.MARK] * self.COST
            k = ord(ch) - self.PRIVATE
            out.append(self.PRE + k if 0 <= k < 5 else ord(ch))
        return out

    def decode(self, ids) -> str:
        return "".join(self._char(int(i)) for i in ids)

    def _char(self, i: int) -> str:
        if i == self.MARK:
            return ""
        return chr(i) if i < self.MARK else chr(i - self.PRE + self.PRIVATE)


REP = RepeatTokenizer()
REP_CFG = FIMConfig(
    prefix_id=REP.PRE, middle_id=REP.MID, suffix_id=REP.SUF, eod_id=REP.EOD, pad_id=REP.PAD,
    rate=1.0, spm_rate=0.5,
)  # fmt: skip


# --- the layouts, and their inverse -------------------------------------------------------------


def test_layouts_match_the_documented_token_order():
    cfg = byte_cfg()
    text = "ab你ef"  # "你" is three bytes: the pieces are cut at characters, not bytes
    b = lambda s: list(s.encode("utf-8"))
    psm = encode_fim(text, 2, 3, spm=False, cfg=cfg, tokenizer=TOK)
    spm = encode_fim(text, 2, 3, spm=True, cfg=cfg, tokenizer=TOK)
    assert psm.dtype == np.int64
    assert psm.tolist() == [PRE, *b("ab"), SUF, *b("ef"), MID, *b("你")]
    assert spm.tolist() == [PRE, SUF, *b("ef"), MID, *b("ab"), *b("你")]
    assert fim_layout(psm, cfg) == "psm" and fim_layout(spm, cfg) == "spm"
    assert fim_layout(TOK.encode(text), cfg) is None
    # Empty text: only the sentinels.
    assert encode_fim("", 0, 0, spm=False, cfg=cfg, tokenizer=TOK).tolist() == [PRE, SUF, MID]
    with pytest.raises(ValueError, match="cut points"):
        encode_fim(text, 3, 2, spm=False, cfg=cfg, tokenizer=TOK)


@pytest.mark.parametrize("spm", [False, True])
def test_undo_inverts_every_cut_of_short_texts(spm: bool):
    cfg = byte_cfg()
    texts = ["", "a", "\n", "é", "🙂", "a\nb", "你好\n🙂", "e\u0301x\x00", "  \t\n"]
    for text in texts:
        for lo in range(len(text) + 1):
            for hi in range(lo, len(text) + 1):
                ids = encode_fim(text, lo, hi, spm=spm, cfg=cfg, tokenizer=TOK)
                assert undo_fim(ids, cfg, TOK) == text, (text, lo, hi)
                assert len(ids) == len(text.encode("utf-8")) + 3


@pytest.mark.parametrize("tokenizer,cfg", [(TOK, byte_cfg(1.0)), (REP, REP_CFG)])
@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_undo_inverts_fim_document_on_random_texts(tokenizer, cfg: FIMConfig, spm_rate: float):
    cfg = FIMConfig(**{**cfg.__dict__, "rate": 1.0, "spm_rate": spm_rate})
    rng = random.Random(11)
    for i in range(400):
        text = random_text(rng, 60) if i % 2 else ascii_text(rng, rng.randint(0, 30)) + "aaa"
        ids = tokenizer.encode(text)
        out = fim_document(ids, cfg, tokenizer, document_rng(3, 0, i, 0))
        if not text:
            assert out.tolist() == []  # empty documents are never rewritten
            continue
        assert out[0] == cfg.prefix_id
        assert undo_fim(out, cfg, tokenizer) == text
        # An SPM document always reads as SPM; a PSM one only when its prefix is empty.
        if spm_rate == 1.0:
            assert fim_layout(out, cfg) == "spm"
        elif out[1] != cfg.suffix_id:
            assert fim_layout(out, cfg) == "psm"


def test_undo_rejects_documents_that_are_not_fim():
    cfg = byte_cfg()
    good = encode_fim("hello world", 3, 7, spm=False, cfg=cfg, tokenizer=TOK)
    for bad, why in [
        (TOK.encode("plain"), "once"),
        (good[: int(np.flatnonzero(good == MID)[0])], "once"),  # truncated before MID
        (np.r_[good[1:], [PRE]], "start with prefix_id"),
        (np.r_[good, [EOD]], "eod_id"),
        (np.array([PRE, MID, SUF]), "precedes"),
    ]:
        with pytest.raises(ValueError, match=why):
            undo_fim(bad, cfg, TOK)


# --- rates and the cut distribution -------------------------------------------------------------


def within(count: int, n: int, p: float, sds: float) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate,spm_rate", [(0.5, 0.5), (0.2, 0.85)])
def test_observed_rates(rate: float, spm_rate: float):
    cfg = byte_cfg(rate, spm_rate)
    n, length = 4000, 40
    rng = random.Random(5)
    fimmed = looks_spm = 0
    for i in range(n):
        ids = TOK.encode(ascii_text(rng, length))
        out = fim_document(ids, cfg, TOK, document_rng(99, 0, i, 0))
        if out.tolist() == ids:
            continue
        fimmed += 1
        looks_spm += fim_layout(out, cfg) == "spm"
    assert within(fimmed, n, rate, 4), (fimmed, n * rate)
    # A PSM document reads as SPM when its prefix is empty, i.e. when the smaller of two
    # uniform cuts in [0, L] is 0: probability 1 - (L / (L + 1))^2.
    empty_prefix = 1 - (length / (length + 1)) ** 2
    q = spm_rate + (1 - spm_rate) * empty_prefix
    assert within(looks_spm, fimmed, q, 4), (looks_spm, fimmed * q)


def test_cut_points_are_two_sorted_uniform_draws():
    cfg = byte_cfg(1.0, 0.0)
    text, n = "abcd", 4000
    counts: dict[tuple[int, int], int] = {}
    for i in range(n):
        out = fim_document(TOK.encode(text), cfg, TOK, document_rng(1, 2, i, 0)).tolist()
        suf, mid = out.index(SUF), out.index(MID)
        lo, hi = suf - 1, suf - 1 + len(out) - mid - 1  # len(prefix), + len(middle)
        assert TOK.decode(out[1:suf]) == text[:lo] and TOK.decode(out[mid + 1 :]) == text[lo:hi]
        counts[lo, hi] = counts.get((lo, hi), 0) + 1
    cells = [(lo, hi) for lo in range(5) for hi in range(lo, 5)]
    assert set(counts) <= set(cells)
    # Sorted pair of two uniform draws from 0..4: 2/25 for lo < hi, 1/25 for lo == hi.
    # 15 cells at 4.5 sd each: a correct sampler fails with probability about 1e-4.
    for lo, hi in cells:
        p = (1 if lo == hi else 2) / 25
        assert within(counts.get((lo, hi), 0), n, p, 4.5), (lo, hi, counts.get((lo, hi)))


def test_rate_zero_leaves_samples_unchanged_and_rate_one_rewrites_every_document():
    rng = random.Random(8)
    rewritten = 0
    for i in range(60):
        sample = packed_sample(rng, 300)
        tokens, mask = apply_fim(sample, byte_cfg(0.0), TOK, seed=4, sample_index=i)
        assert tokens.tolist() == sample.tolist() and mask.tolist() == [1.0] * 300
        tokens, mask = apply_fim(sample, byte_cfg(1.0), TOK, seed=4, sample_index=i)
        docs_in, docs_out = split_at(sample, EOD), split_at(tokens, EOD)
        # The first and last runs may be fragments cut inside a character; the complete
        # documents between them are all rewritten unless empty.
        for before, after in zip(docs_in[1:-1], docs_out[1 : len(docs_out) - 1]):
            if before.size:
                assert after[0] == PRE and undo_fim(after, byte_cfg(), TOK) == TOK.decode(before)
                rewritten += 1
            else:
                assert after.size == 0
    assert rewritten > 100


# --- determinism --------------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_document_seed_follows_the_documented_formula():
    for values in [(0, 0, 0, 0), (1234, 1, 77, 3), (2**32 - 1, 5, 10**9, 400), (2**64 - 1,) * 4]:
        h = 0x46494D2D524E4731
        for v in values:
            h = _splitmix64(h ^ v)
        assert document_seed(*values) == h
        expected = np.random.RandomState([h & 0xFFFFFFFF, h >> 32]).random_sample(3)
        assert document_rng(*values).random_sample(3).tolist() == expected.tolist()
    for bad in [-1, 2**64, 1.0]:
        with pytest.raises(ValueError, match="sample_index"):
            document_seed(1, 0, bad, 0)


def _digests(indices, seed: int = 21) -> dict[int, str]:
    rng = random.Random(3)
    samples = [packed_sample(rng, 257) for _ in range(40)]
    out = {}
    for i in indices:
        tokens, mask = apply_fim(samples[i], byte_cfg(), TOK, seed=seed, sample_index=i, epoch=2)
        out[i] = hashlib.sha256(tokens.tobytes() + mask.tobytes()).hexdigest()
    return out


def test_same_index_same_output_in_any_order_and_process():
    forward = _digests(range(40))
    assert len(set(forward.values())) == 40
    order = list(range(40))
    random.Random(0).shuffle(order)
    for indices in (reversed(range(40)), order):
        # Disturbing the global generators must not matter either.
        np.random.seed(12345)
        np.random.random_sample(7)
        random.seed(1)
        assert _digests(indices) == forward
    code = (
        "import json, sys; sys.path.insert(0, 'tests/data'); from test_fim import _digests; "
        "print(json.dumps(_digests(range(40))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "777", "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    assert {int(k): v for k, v in json.loads(child.stdout).items()} == forward
    assert _digests(range(40), seed=22) != forward


def _cuts(sample: np.ndarray, cfg: FIMConfig, **where) -> list[tuple[int, int]]:
    """(len(prefix), len(prefix) + len(middle)) of every rewritten document (PSM only)."""
    tokens, _ = apply_fim(sample, cfg, TOK, **where)
    cuts = []
    for doc in split_at(tokens, EOD):
        ids = doc.tolist()
        if ids and ids[0] == PRE and MID in ids:
            suf, mid = ids.index(SUF), ids.index(MID)
            cuts.append((suf - 1, suf - 1 + len(ids) - mid - 1))
    return cuts


def test_different_index_position_epoch_or_seed_gives_different_cuts():
    cfg = byte_cfg(1.0, 0.0)
    long_doc = np.array(TOK.encode(ascii_text(random.Random(1), 10000)), dtype=np.int64)
    by_index = [_cuts(long_doc, cfg, seed=1, sample_index=i)[0] for i in range(200)]
    # Two sorted draws from 0..10000 coincide with probability ~2e-8 per pair.
    assert len(set(by_index)) >= 199
    by_epoch = [_cuts(long_doc, cfg, seed=1, sample_index=0, epoch=e)[0] for e in range(50)]
    assert len(set(by_epoch)) >= 49
    by_seed = [_cuts(long_doc, cfg, seed=s, sample_index=0)[0] for s in range(50)]
    assert len(set(by_seed)) >= 49
    # The same document repeated inside one sample is cut differently at each position.
    doc = TOK.encode(ascii_text(random.Random(2), 3000))
    repeated = np.array((doc + [EOD]) * 30, dtype=np.int64)
    by_position = _cuts(repeated, cfg, seed=1, sample_index=0)
    assert len(by_position) == 30 and len(set(by_position)) >= 29


# --- packed samples -----------------------------------------------------------------------------


def test_packed_samples_keep_length_documents_and_eod_positions():
    cfg = byte_cfg(0.5, 0.5)
    rng = random.Random(17)
    fimmed = truncated = 0
    for i in range(150):
        sample = packed_sample(rng, 513)
        tokens, mask = apply_fim(sample, cfg, TOK, seed=3, sample_index=i)
        assert tokens.dtype == np.int64 and mask.dtype == np.float32
        assert tokens.shape == sample.shape == mask.shape
        # The byte tokenizer never makes a document shorter, so there is no padding.
        assert mask.tolist() == [1.0] * len(sample)
        # Walk the input documents: each is either copied or rewritten as 3 sentinels + its
        # bytes (its EOD shifts by exactly 3 per rewritten document before it), and only the
        # end of the sample may be cut off.
        pos, docs = 0, split_at(sample, EOD)
        for k, doc in enumerate(docs):
            last = k == len(docs) - 1
            if pos >= len(tokens):
                truncated += 1
                break
            if tokens[pos] == PRE:
                size = len(doc) + 3
                fimmed += 1
            else:
                size = len(doc)
            piece = tokens[pos : pos + size]
            if pos + size > len(tokens):  # cut by the sample end: the end of the output
                assert EOD not in piece.tolist()
                truncated += 1
                break
            if tokens[pos] == PRE:
                assert undo_fim(piece, cfg, TOK) == TOK.decode(doc)
            else:
                assert piece.tolist() == doc.tolist()
            pos += size
            if not last:
                if pos < len(tokens):
                    assert tokens[pos] == EOD
                pos += 1
        else:
            assert pos == len(tokens) == len(sample)  # nothing rewritten in this sample
        first = next((j for j, t in enumerate(tokens.tolist()) if t == PRE), len(tokens))
        assert tokens[:first].tolist() == sample[:first].tolist()
    assert fimmed > 200 and truncated > 50


def test_result_is_the_documents_rewritten_one_by_one_then_truncated():
    cfg = byte_cfg(0.5, 0.5)
    rng = random.Random(23)
    for i in range(40):
        sample = packed_sample(rng, 200)
        tokens, _ = apply_fim(sample, cfg, TOK, seed=9, sample_index=i, epoch=1)
        pieces = []
        for k, doc in enumerate(split_at(sample, EOD)):
            pieces += fim_document(doc, cfg, TOK, document_rng(9, 1, i, k)).tolist() + [EOD]
        assert tokens.tolist() == pieces[: len(sample)]


@pytest.mark.parametrize("pad_id", [REP.PAD, None])
def test_shorter_results_are_padded_and_masked(pad_id: int | None):
    cfg = FIMConfig(**{**REP_CFG.__dict__, "pad_id": pad_id})
    pad = REP.EOD if pad_id is None else pad_id
    rng = random.Random(4)
    padded = 0
    for i in range(60):
        texts = ["".join(rng.choice("ab") * rng.randint(1, 6) for _ in range(8)) for _ in range(5)]
        sample = np.array(sum((REP.encode(t) + [REP.EOD] for t in texts), []), dtype=np.int64)
        tokens, mask = apply_fim(sample, cfg, REP, seed=0, sample_index=i)
        assert len(tokens) == len(mask) == len(sample)
        real = int(mask.sum())
        assert mask[:real].tolist() == [1.0] * real and mask[real:].tolist() == [0.0] * (
            len(sample) - real
        )
        assert tokens[real:].tolist() == [pad] * (len(sample) - real)
        if real < len(sample):
            padded += 1
            # Nothing was cut: every document comes back in full.
            docs = split_at(tokens[:real], REP.EOD)
            assert docs[-1].size == 0 and len(docs) == len(texts) + 1
            assert [undo_fim(d, cfg, REP) for d in docs[:-1]] == texts
    assert padded > 30


def test_fit_to_length():
    tokens, mask = fit_to_length(np.array([5, 6, 7]), 5, 9)
    assert tokens.tolist() == [5, 6, 7, 9, 9] and mask.tolist() == [1, 1, 1, 0, 0]
    tokens, mask = fit_to_length(np.array([5, 6, 7]), 2, 9)
    assert tokens.tolist() == [5, 6] and mask.tolist() == [1, 1]
    tokens, mask = fit_to_length(np.array([], dtype=np.int64), 2, 9)
    assert tokens.tolist() == [9, 9] and mask.tolist() == [0, 0]


def test_lossy_fragments_and_sentinels_are_left_alone():
    cfg = byte_cfg(1.0)
    ni = TOK.encode("你")
    # A sample starting and ending inside "你": rewriting these fragments would turn their
    # bytes into U+FFFD. (A rewritten document in between would push the tail out: +3 tokens.)
    head, tail = ni[1:] + TOK.encode("xyz"), TOK.encode("ab") + ni[:2]
    sample = np.array(head + [EOD] + tail)
    for i in range(20):
        tokens, mask = apply_fim(sample, cfg, TOK, seed=0, sample_index=i)
        assert tokens.tolist() == sample.tolist() and mask.min() == 1
    whole = TOK.encode("ab你")
    rewritten = apply_fim(np.array(whole + [EOD] + tail), cfg, TOK, seed=0, sample_index=0)[0]
    assert rewritten[0] == PRE and undo_fim(rewritten[: len(whole) + 3], cfg, TOK) == "ab你"
    with_sentinel = TOK.encode("ab") + [SUF] + TOK.encode("cd")
    with_pad = TOK.encode("ab") + [PAD]  # decodes to the text "ab<pad>", not back to PAD
    with_eod = TOK.encode("ab") + [EOD] + TOK.encode("cd")  # fim_document called directly
    for doc in (with_sentinel, with_pad, with_eod):
        for i in range(20):
            assert fim_document(doc, cfg, TOK, document_rng(0, 0, i, 0)).tolist() == doc
    # With a tokenizer that round-trips special tokens, only the sentinel/EOD check helps.
    plain = REP.encode("abcdef")
    assert REP.encode(REP.decode(plain + [REP.EOD])) == plain + [REP.EOD]
    for special in (REP.PRE, REP.MID, REP.SUF, REP.EOD):
        doc = plain[:3] + [special] + plain[3:]
        for i in range(20):
            assert fim_document(doc, REP_CFG, REP, document_rng(0, 0, i, 0)).tolist() == doc


def test_bad_samples_are_rejected():
    cfg = byte_cfg()
    with pytest.raises(ValueError, match="1-D"):
        apply_fim(np.zeros((2, 3), dtype=np.int64), cfg, TOK, seed=0, sample_index=0)
    with pytest.raises(ValueError, match="int token ids"):
        apply_fim(np.zeros(4, dtype=np.float32), cfg, TOK, seed=0, sample_index=0)
    with pytest.raises(ValueError, match="seed"):
        apply_fim(np.zeros(4, dtype=np.int64), cfg, TOK, seed=-1, sample_index=0)


# --- configuration ------------------------------------------------------------------------------


def test_from_tokenizer_reads_the_byte_tokenizer_ids():
    cfg = FIMConfig.from_tokenizer(TOK, rate=0.25, spm_rate=0.75)
    assert (cfg.prefix_id, cfg.middle_id, cfg.suffix_id) == (259, 260, 261)
    assert (cfg.eod_id, cfg.pad_id, cfg.rate, cfg.spm_rate) == (256, 257, 0.25, 0.75)
    with pytest.raises(ValueError, match="fim_prefix"):
        FIMConfig.from_tokenizer(REP)
    with pytest.raises(AttributeError):
        cfg.rate = 1.0  # frozen


@pytest.mark.parametrize(
    "field,value",
    [
        ("rate", -0.1),
        ("rate", 1.5),
        ("rate", float("nan")),
        ("rate", "0.5"),
        ("spm_rate", 2),
        ("spm_rate", None),
        ("prefix_id", -1),
        ("middle_id", 3.0),
        ("suffix_id", True),
        ("eod_id", -5),
        ("pad_id", -2),
        ("middle_id", PRE),  # duplicates a sentinel
        ("pad_id", SUF),
        ("eod_id", MID),
    ],
)
def test_bad_config_values_name_the_field(field: str, value):
    with pytest.raises(ValueError, match=f"FIMConfig.{field}"):
        FIMConfig(**{**byte_cfg().__dict__, field: value})


def test_pad_may_equal_eod():
    assert FIMConfig(**{**byte_cfg().__dict__, "pad_id": EOD}).pad_id == EOD
