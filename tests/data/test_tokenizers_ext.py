"""SentencePiece and Hugging Face tokenizers: training a SentencePiece model on local files,
lossless round trips (code whitespace included), Yuan 2.0's specials (found or appended),
preprocessing and training through ``data.tokenizer`` specs, and clear errors."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from yuanlfa.cli.train_tokenizer import main as train_tokenizer
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.data import DataError, MMapIndexedDataset, build_tokenizer, preprocess_files
from yuanlfa.data.special_tokens import SPECIAL_TOKENS, YUAN_SPECIAL_TOKENS

spm = pytest.importorskip("sentencepiece")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "shlex.py", "heapq.py", "bisect.py", "fnmatch.py", "queue.py"]
SAMPLES = [
    "def foo(x):\n    return x + 12345  # héllo\n\n\tend  ",
    "  leading spaces and trailing  ",
    "中文 text ✓ and emoji 🙂",
    " ",
    "",
    "<eod> written literally",
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "spm"
    files = [str(STDLIB / f) for f in FILES]
    assert train_tokenizer(["--input", *files, "--vocab-size", "600", "--output-prefix",
                            str(out)]) == 0  # fmt: skip
    return Path(f"{out}.model")


def test_sentencepiece_round_trips_and_has_the_specials(spm_model: Path) -> None:
    tok = build_tokenizer(f"sentencepiece:{spm_model}")
    assert tok.vocab_size == 600  # the specials are pieces of a model trained here
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and max(ids) < 600
    assert tok.eod == tok.token_to_id("<eod>")
    for text in SAMPLES + [(STDLIB / "abc.py").read_text()]:
        assert tok.decode(tok.encode(text)) == text
    # Learned pieces, not bytes: real compression on code it has not seen.
    code = (STDLIB / "colorsys.py").read_text()
    assert len(tok.encode(code)) < 0.8 * len(code.encode())
    assert tok.decode([*tok.encode("a"), tok.eod, *tok.encode("b")]) == "a<eod>b"


def test_a_model_without_the_specials_gets_them_appended(tmp_path: Path) -> None:
    prefix = tmp_path / "plain"
    text = tmp_path / "in.txt"
    text.write_text((STDLIB / "textwrap.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=300, minloglevel=2
    )
    tok = build_tokenizer(f"sentencepiece:{prefix}.model")
    # All of Yuan 2.0's specials, appended in its order (<eod>, <sep>, <pad>, <mask>, ...).
    assert tok.vocab_size == 300 + len(YUAN_SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in YUAN_SPECIAL_TOKENS] == list(range(300, 316))
    assert set(SPECIAL_TOKENS) <= set(YUAN_SPECIAL_TOKENS)
    assert tok.decode([tok.fim_prefix, tok.fim_suffix]) == "<FIM_PREFIX><FIM_SUFFIX>"
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([316])


def _hf_dir(tmp_path: Path, specials: list[str]) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([(STDLIB / f).read_text() for f in FILES], trainer)
    out = tmp_path / "hf"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return out


def test_hugging_face_tokenizer_from_a_directory(tmp_path: Path) -> None:
    directory = _hf_dir(tmp_path, ["</s>", "<pad>"])
    tok = build_tokenizer(f"huggingface:{directory}")
    base = tok.vocab_size - 4  # <sep> and the three FIM sentinels are appended
    assert tok.eod == tok._tok.token_to_id("</s>")  # the eos_token of tokenizer_config.json
    assert tok.pad == tok._tok.token_to_id("<pad>")
    assert sorted([tok.sep, tok.fim_prefix, tok.fim_middle, tok.fim_suffix]) == list(
        range(base, base + 4)
    )
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.fim_middle]) == "<FIM_MIDDLE>"


def test_preprocess_and_train_with_a_sentencepiece_spec(spm_model: Path, tmp_path: Path) -> None:
    from yuanlfa.train import train

    spec = f"sentencepiece:{spm_model}"
    prefix = str(tmp_path / "data")
    preprocess_files([str(STDLIB / f) for f in FILES], prefix, build_tokenizer(spec))
    data = MMapIndexedDataset(prefix)
    assert data.dtype == np.uint16  # 600 ids fit
    tok = build_tokenizer(spec)
    first = np.asarray(data.get(0))
    assert first[-1] == tok.eod and tok.decode(first[:-1]) == (STDLIB / FILES[0]).read_text()
    cfg = config_from_dict({
        "model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": None},
        "data": {"path": prefix, "tokenizer": spec, "split": "90,10,0"},
        "train": {"steps": 8, "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 32,
                  "eval_iters": 0, "device": "cpu"},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
    })  # fmt: skip
    records = train(cfg, progress=False).records
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["loss"] == pytest.approx(np.log(640), rel=0.15)  # vocab padded to 640


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bpe", "not a tokenizer"),
        ("sentencepiece:", "not a tokenizer"),
        ("sentencepiece:/nonexistent/x.model", "not found"),
        ("huggingface:/nonexistent", "not found"),
    ],
)
def test_bad_tokenizer_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"tokenizer": spec}})
    with pytest.raises(DataError):
        build_tokenizer(spec)


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        build_tokenizer(f"sentencepiece:{bad}")
    assert train_tokenizer(["--input", str(bad), "--vocab-size", "100", "--output-prefix",
                            str(tmp_path / "x")]) == 2  # fmt: skip
