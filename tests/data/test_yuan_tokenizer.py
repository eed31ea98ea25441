"""Yuan 2.0's released tokenizer gives Yuan's ids: ``sentencepiece:PATH`` against Yuan 2.0's own
procedure (transformers' ``LlamaTokenizer`` in legacy mode, ``eos_token='<eod>'``, Yuan's special
tokens added) on a varied corpus, its special ids and vocabulary; ``yuanlfa-preprocess
--input-format yuan`` against Yuan's preprocessing of the same lines; SFT loss masks of
``prompt<sep>answer`` documents. The reference procedures are written here from Yuan 2.0's
``megatron/tokenizer/tokenizer.py`` and ``tools/preprocess_data_yuan.py`` (commit 2f59b3f)."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from yuanlfa.cli.preprocess import main as preprocess_main
from yuanlfa.data import (
    DataError,
    MMapIndexedDataset,
    PackedDataset,
    build_tokenizer,
    preprocess_files,
)
from yuanlfa.data.fim import FIMConfig
from yuanlfa.data.special_tokens import YUAN_SPECIAL_TOKENS
from yuanlfa.data.spm import SentencePieceTokenizer

pytest.importorskip("sentencepiece")

YUAN_DIR = Path(__file__).parent / "yuan_tokenizer"
YUAN_MODEL = YUAN_DIR / "tokenizer.model"
# What Yuan 2.0's code passes to add_tokens, in its order.
YUAN_ADDED = [
    "<sep>", "<pad>", "<mask>", "<predict>", "<FIM_SUFFIX>", "<FIM_PREFIX>", "<FIM_MIDDLE>",
    "<commit_before>", "<commit_msg>", "<commit_after>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>",
]  # fmt: skip
YUAN_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "<eod>": 77185,
    "<sep>": 77187,
    "<pad>": 77188,
    "<mask>": 134953,
    "<predict>": 134954,
    "<FIM_SUFFIX>": 134955,
    "<FIM_PREFIX>": 134956,
    "<FIM_MIDDLE>": 134957,
}
MATCHED = ["<unk>", "<s>", "<eod>", *YUAN_ADDED]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "\tleading tab, trailing newline\n",
    "\n\nblank lines first",
    "袁2.0是一个大型语言模型。它支持中文和英文！",
    "混合 mixed 文本 text，标点：“引号”",
    "def foo(x):\n\treturn x + 12345  # héllo\n\n\n\tend  \n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "3.14159 2718281828 0x1F 1e-9 -42 ١٢٣ ½ Ⅻ",
    "emoji 🙂👍🏽👨‍👩‍👧 🇨🇳 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 \u200b zero-width \ufeff bom",
    "control \x00\x01\x7f chars and combining é (e + \u0301)",
    "▁ literal dummy-prefix marks ▁▁ and ▃ blocks",
    "world<sep>Bonjour",
    "<sep>",
    "<sep><sep><eod>",
    "<eod>start and end<eod>",
    " <sep> spaces around <pad> ",
    "\n<sep>\nnewlines around\n<eod>\n",
    "\t<mask>\t<predict>\t",
    "<FIM_PREFIX>def f(x):<FIM_SUFFIX>    return y<FIM_MIDDLE>    y = x * 2\n",
    "<commit_before>a<commit_msg>fix<commit_after>b",
    "<jupyter_start><jupyter_text>text<jupyter_code>x=1<jupyter_output>1<empty_output>",
    "<unk> and <s> and </s> as text",
    "中文<sep>回答",
    "🙂<eod>😀",
    "almost specials: <sep <SEP> <se p> sep> << sep >> <<sep>> <s><s>>",
    "   ",
    "\n",
    "",
]


def yuan_reference(path: Path = YUAN_DIR):
    """Yuan 2.0's tokenizer as its own code builds it."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.LlamaTokenizer.from_pretrained(
        str(path), add_eos_token=False, add_bos_token=False, eos_token="<eod>", legacy=True
    )
    tok.add_tokens(YUAN_ADDED, special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def reference():
    return yuan_reference()


@pytest.fixture(scope="module")
def yuan():
    return build_tokenizer(f"sentencepiece:{YUAN_MODEL}")


def fuzz_texts(n: int, seed: int) -> list[str]:
    """Random concatenations of fragments: specials, whitespace, scripts, digits, emoji."""
    fragments = [
        *MATCHED, "</s>", "<", ">", "<se", "p>", " ", "  ", "\t", "\n", "\r\n", "▁", "a", "word",
        " the", "中文", "，", "🙂", "👨‍👩‍👧", "123", "4", "é", "\u0301", "\x00", "[SEP]", "<n>",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choices(fragments, k=rng.randint(1, 12))) for _ in range(n)]


def test_ids_equal_yuans_procedure(reference, yuan) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [*CORPUS, *fuzz_texts(1500, seed=0), (stdlib / "textwrap.py").read_text()]
    for text in texts:
        assert yuan.encode(text) == reference.encode(text), repr(text)


def test_special_ids_vocabulary_and_decoding(reference, yuan) -> None:
    assert yuan.vocab_size == len(reference) == 134958
    assert reference.eos_token_id == yuan.eod == 77185
    for name, i in YUAN_IDS.items():
        assert yuan.token_to_id(name) == reference.convert_tokens_to_ids(name) == i, name
    for name in MATCHED:  # every token Yuan matches in text is one id, the same one
        assert yuan.encode(name) == [reference.convert_tokens_to_ids(name)], name
    assert (yuan.sep, yuan.pad) == (77187, 77188)
    assert (yuan.fim_prefix, yuan.fim_middle, yuan.fim_suffix) == (134956, 134957, 134955)
    fim = FIMConfig.from_tokenizer(yuan)  # data.fim_rate's sentinels: Yuan's
    assert (fim.prefix_id, fim.middle_id, fim.suffix_id) == (134956, 134957, 134955)
    assert (fim.eod_id, fim.pad_id) == (77185, 77188)
    # Every id decodes; the appended ones by name.
    assert isinstance(yuan.decode(range(yuan.vocab_size)), str)
    assert yuan.decode(range(134953, 134958)) == "".join(
        ["<mask>", "<predict>", "<FIM_SUFFIX>", "<FIM_PREFIX>", "<FIM_MIDDLE>"]
    )
    assert yuan.decode(yuan.encode("a<sep>b<eod>")) == "a<sep>b<eod>"
    with pytest.raises(DataError, match="outside the vocabulary"):
        yuan.decode([134958])
    with pytest.raises(DataError, match="no token"):
        yuan.token_to_id("<not a piece>")


def test_any_sentencepiece_model_follows_yuans_procedure(tmp_path: Path) -> None:
    """A model without Yuan's specials gets them appended in Yuan's order: the ids Yuan's
    procedure gives it."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "in.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus.write_text((stdlib / "textwrap.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, minloglevel=2
    )
    reference = yuan_reference(tmp_path)
    tok = build_tokenizer(f"sentencepiece:{tmp_path / 'tokenizer.model'}")
    assert tok.vocab_size == len(reference) == 300 + len(YUAN_SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in YUAN_SPECIAL_TOKENS] == list(range(300, 316))
    for name in MATCHED:
        assert tok.token_to_id(name) == reference.convert_tokens_to_ids(name), name
    for text in [*CORPUS, *fuzz_texts(300, seed=1)]:
        assert tok.encode(text) == reference.encode(text), repr(text)


def yuan_preprocess_reference(path: Path, reference) -> list[list[int]]:
    """Yuan 2.0's preprocessing of one file (document level), from its
    tools/preprocess_data_yuan.py: Encoder.encode on every line, in file order."""
    docs = []
    with open(path, encoding="utf-8", errors="ignore") as fin:
        for line in fin:
            if line == "\n":
                continue
            if line[:3] == "<n>":
                data = line[3:].strip().replace("\r", "").replace("\n", "")
            else:
                data = line.strip().replace("\r", "").replace("\n", "")
            data = data.replace("<n>", "\n").replace("\u2583", "")
            data = data.replace("[SEP]", "<sep>")
            if re.sub(r"(\n)+", "", data) == "":
                continue
            ids = reference.encode(data)
            ids.append(reference.eos_token_id)
            docs.append(ids)
    return docs


def yuan_lines() -> bytes:
    """A Yuan-format file: one sample per line, newlines written <n>, with the odd cases."""
    samples = [
        *(t.replace("\n", "<n>").replace("\r", "") for t in CORPUS),
        "John买了3件衬衫，每件售价为20美元。<sep>3 \\times 20 = 60美元。<n>因此共66美元。",
        "<n>a line starting with <n>  ",
        "<n><n><n>",
        "   <n>   ",
        "text then newlines<n><n>",
        "[SEP] as Yuan's older separator[SEP]answer",
        "▃ removed ▃▃",
        "▃",
        "tabs\tinside\tand trailing\t",
        "\u3000ideographic space strip\u3000",
        *(t.replace("\n", "<n>").replace("\r", "") for t in fuzz_texts(200, seed=2)),
    ]
    body = "\n".join(samples) + "\n\n\n   \nwindows line\r\nold mac line\rlast line, no newline"
    return body.encode("utf-8") + b"\xff\xfe invalid bytes dropped\n"


def read_docs(prefix: Path) -> list[list[int]]:
    ds = MMapIndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_preprocess_yuan_format_equals_yuans_preprocessing(tmp_path, reference) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(yuan_lines())
    b.write_text("second file<sep>its answer\n<n>\nlast<n>", encoding="utf-8")
    expected = yuan_preprocess_reference(a, reference) + yuan_preprocess_reference(b, reference)
    assert len(expected) > 200
    spec = f"sentencepiece:{YUAN_MODEL}"
    argv = ["--input", str(a), str(b), "--tokenizer", spec, "--input-format", "yuan", "--quiet"]
    assert preprocess_main([*argv, "--output-prefix", str(tmp_path / "one")]) == 0
    assert read_docs(tmp_path / "one") == expected
    # Several workers and small batches: the same documents in the same order.
    from yuanlfa.data import preprocess as module

    module_batch = module._JSONL_TASK_BYTES
    module._JSONL_TASK_BYTES = 500
    try:
        preprocess_files(
            [a, b], tmp_path / "two", spec, workers=2, progress=False, input_format="yuan"
        )
    finally:
        module._JSONL_TASK_BYTES = module_batch
    assert read_docs(tmp_path / "two") == expected


def test_default_input_format_keeps_text_as_given(tmp_path, yuan) -> None:
    src = tmp_path / "doc.txt"
    src.write_text("  a<n>b  \n\nc<sep>d\n", encoding="utf-8")
    preprocess_files([src], tmp_path / "out", yuan, progress=False)
    assert read_docs(tmp_path / "out") == [yuan.encode("  a<n>b  \n\nc<sep>d\n") + [yuan.eod]]
    with pytest.raises(DataError, match="unknown input format"):
        preprocess_files([src], tmp_path / "x", yuan, progress=False, input_format="csv")
    with pytest.raises(SystemExit):  # the default corpus is Python sources, not Yuan's format
        preprocess_main(["--default-corpus", "--input-format", "yuan", "--output-prefix", "x"])


def test_sft_masks_the_prompts_of_yuan_format_samples(tmp_path, yuan) -> None:
    """prompt<sep>answer lines: loss only on the answer and its <eod> (data.sft)."""
    rng = random.Random(3)
    words = ["问题", "answer", "的", "数字", "42", " ", "code()", "<n>", "。"]
    # Q and A ends: the line's strip and its leading-<n> rule leave both parts as written.
    pairs = [
        ("Q" + "".join(rng.choices(words, k=rng.randint(0, 8))),
         "".join(rng.choices(words, k=rng.randint(0, 8))) + "A")
        for _ in range(40)
    ]  # fmt: skip
    src = tmp_path / "sft.txt"
    src.write_text("".join(f"{p}<sep>{a}\n" for p, a in pairs), encoding="utf-8")
    preprocess_files([src], tmp_path / "sft", yuan, progress=False, input_format="yuan")
    indexed = MMapIndexedDataset(str(tmp_path / "sft"))
    docs = [indexed[i].tolist() for i in range(len(indexed))]
    assert len(docs) == len(pairs)
    for doc, (prompt, _) in zip(docs, pairs):
        prompt_ids = yuan.encode(prompt.replace("<n>", "\n"))
        assert doc[: len(prompt_ids) + 1] == [*prompt_ids, yuan.sep]
        assert doc.count(yuan.sep) == 1 and doc[-1] == yuan.eod
    seq = 32
    ds = PackedDataset(
        indexed,
        seq_length=seq,
        num_samples=30,
        seed=1,
        eod_id=yuan.eod,
        documents=np.arange(len(docs)),
        sft_sep_id=yuan.sep,
    )
    # Per token of the document stream: 1 after its document's <sep>, 0 up to and with it.
    stream = np.concatenate([np.array(docs[d]) for d in ds.doc_order])
    answer = np.concatenate(
        [np.arange(len(docs[d])) > docs[d].index(yuan.sep) for d in ds.doc_order]
    )
    masked = 0
    for i in range(len(ds)):
        start = int(ds.shuffle_index[i]) * seq
        item = ds[i]
        np.testing.assert_array_equal(item["labels"].numpy(), stream[start + 1 : start + seq + 1])
        expected = answer[start + 1 : start + seq + 1].astype(np.float32)
        np.testing.assert_array_equal(item["loss_mask"].numpy(), expected, err_msg=str(i))
        masked += int((expected == 0).sum())
    assert masked > 100


def test_strip_around_added_equals_transformers_4_31() -> None:
    """Ids recorded with transformers 4.31.0, which dropped the whitespace next to added tokens
    (see yuan_tokenizer/README.md): strip_around_added=True gives them, the default does not."""
    recorded = json.loads((YUAN_DIR / "ids_transformers_4_31_0.json").read_text())
    assert recorded["transformers"] == "4.31.0" and len(recorded["cases"]) > 400
    strip = SentencePieceTokenizer(YUAN_MODEL, strip_around_added=True)
    default = SentencePieceTokenizer(YUAN_MODEL)
    assert strip.name != default.name  # different ids: different data caches
    differ = 0
    for text, ids in recorded["cases"]:
        assert strip.encode(text) == ids, repr(text)
        differ += default.encode(text) != ids
    assert differ > 100
    # " a" <sep> "b " <eod> " c ": stripped next to <sep>, kept next to <eod> (as 4.31.0 did).
    expected = [29871, 263, 77187, 289, 29871, 77185, 29871, 274, 29871]
    assert strip.encode(" a <sep>\n b <eod> c ") == expected
