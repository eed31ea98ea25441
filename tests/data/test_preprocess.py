from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from yuanlfa.cli.preprocess import main
from yuanlfa.data import (
    ByteTokenizer,
    DataError,
    MMapIndexedDataset,
    default_corpus_files,
    ensure_default_corpus,
    preprocess_files,
)
from yuanlfa.data import corpus as corpus_module

EOD = 256


def utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[list[Path], list[list[int]]]:
    """Two text files, an empty one and a jsonl, plus the documents they must produce."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a = src / "a.txt"
    a.write_text("first document\nwith two lines\r\n", encoding="utf-8")
    b = src / "sub" / "b.md"
    b.write_bytes("zweites Dokument: äöü".encode() + b"\xff tail")
    empty = src / "empty.txt"
    empty.write_text("")
    records = [{"text": "line one", "id": 1}, {"text": ""}, {"text": "δεύτερη γραμμή"}]
    lines = [json.dumps(r, ensure_ascii=i != 2) for i, r in enumerate(records)]
    c = src / "c.jsonl"
    c.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    expected = [
        utf8("first document\nwith two lines\r\n") + [EOD],
        utf8("zweites Dokument: äöü\ufffd tail") + [EOD],
        utf8("line one") + [EOD],
        utf8("δεύτερη γραμμή") + [EOD],
    ]
    return [a, b, empty, c], expected


def read_all(prefix: str) -> list[list[int]]:
    ds = MMapIndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_documents_and_stats(tmp_path, inputs):
    paths, expected = inputs
    stats = preprocess_files(paths, tmp_path / "out" / "data", ByteTokenizer(), progress=False)
    prefix = str(tmp_path / "out" / "data")
    assert read_all(prefix) == expected
    assert MMapIndexedDataset(prefix).dtype == np.uint16
    assert stats["documents"] == len(expected)
    assert stats["tokens"] == sum(len(d) for d in expected)
    assert stats["bytes"] == sum(p.stat().st_size for p in paths)
    assert stats["seconds"] >= 0


def test_no_eod(tmp_path, inputs):
    paths, expected = inputs
    preprocess_files(paths, tmp_path / "d", "byte", append_eod=False, progress=False)
    assert read_all(str(tmp_path / "d")) == [d[:-1] for d in expected]


def test_workers_give_identical_files(tmp_path, inputs, monkeypatch):
    paths, _ = inputs
    # Many small JSON-lines tasks so that two workers really interleave.
    monkeypatch.setattr("yuanlfa.data.preprocess._JSONL_TASK_BYTES", 64)
    big = tmp_path / "src" / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"doc {i} " * (i % 7)}) + "\n" for i in range(300)))
    paths = [*paths, big]
    preprocess_files(paths, tmp_path / "w1", ByteTokenizer(), workers=1, progress=False)
    preprocess_files(paths, tmp_path / "w2", ByteTokenizer(), workers=2, progress=False)
    for ext in (".bin", ".idx"):
        one = (tmp_path / f"w1{ext}").read_bytes()
        assert one == (tmp_path / f"w2{ext}").read_bytes()
    docs = read_all(str(tmp_path / "w1"))
    assert docs[4:] == [utf8(f"doc {i} " * (i % 7)) + [EOD] for i in range(300) if i % 7]


def test_refuses_overwrite_without_force(tmp_path, inputs):
    paths, expected = inputs
    prefix = tmp_path / "d"
    preprocess_files(paths[:1], prefix, "byte", progress=False)
    before = (tmp_path / "d.bin").read_bytes()
    with pytest.raises(DataError, match="already exist.*--force"):
        preprocess_files(paths, prefix, "byte", progress=False)
    assert (tmp_path / "d.bin").read_bytes() == before
    preprocess_files(paths, prefix, "byte", progress=False, force=True)
    assert read_all(str(prefix)) == expected


def test_json_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'.*--json-key"):
        preprocess_files([bad], tmp_path / "o", "byte", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        preprocess_files([broken], tmp_path / "o", "byte", progress=False)


def test_json_key(tmp_path):
    f = tmp_path / "k.jsonl"
    f.write_text('{"body": "abc"}\n{"body": "de", "text": "ignored"}\n')
    preprocess_files([f], tmp_path / "o", "byte", json_key="body", progress=False)
    assert read_all(str(tmp_path / "o")) == [utf8("abc") + [EOD], utf8("de") + [EOD]]


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="no input files"):
        preprocess_files([], tmp_path / "o", "byte", progress=False)
    with pytest.raises(DataError, match="missing.txt is not a readable file"):
        preprocess_files([tmp_path / "missing.txt"], tmp_path / "o", "byte", progress=False)


def test_cli(tmp_path, inputs, capsys):
    paths, expected = inputs
    out = tmp_path / "cli"
    pattern = str(tmp_path / "src" / "**" / "*.txt")
    argv = ["--input", pattern, str(paths[1]), "--output-prefix", str(out), "--quiet"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "2 documents" in summary and f"{out}.bin" in summary
    # **/*.txt matches a.txt and empty.txt (skipped as empty); then b.md.
    assert read_all(str(out)) == expected[:2]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_glob_without_match(tmp_path, capsys):
    pattern = str(tmp_path / "nothing" / "*.txt")
    code = main(["--input", pattern, "--output-prefix", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("yuanlfa-preprocess: ") and pattern in err and "matches no files" in err
    assert "Traceback" not in err


def test_cli_needs_a_source(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--output-prefix", str(tmp_path / "o")])
    assert exc.value.code == 2


def test_default_corpus_files():
    files = default_corpus_files()
    assert files == default_corpus_files()
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert len(set(files)) == len(files)
    for f in files:
        assert not {"test", "tests", "idlelib", "site-packages"} & set(f.parts)
    total = sum(f.stat().st_size for f in files)
    assert 5e6 <= total <= 15e6


def test_ensure_default_corpus_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("YUANLFA_CACHE", str(tmp_path / "cache"))
    prefix = ensure_default_corpus("byte")
    major, minor = sys.version_info[:2]
    assert prefix == str(tmp_path / "cache" / f"stdlib-py{major}.{minor}-byte")
    ds = MMapIndexedDataset(prefix)
    files = default_corpus_files()
    nonempty = [f for f in files if f.stat().st_size > 0]
    assert len(ds) == len(nonempty)
    first = nonempty[0].read_bytes().decode("utf-8", errors="replace")
    assert ds[0].tolist() == utf8(first) + [EOD]
    stamp = os.stat(prefix + ".bin").st_mtime_ns
    assert ensure_default_corpus(ByteTokenizer()) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp


def test_ensure_default_corpus_concurrent(tmp_path, monkeypatch):
    small = []
    for i in range(5):
        p = tmp_path / f"f{i}.py"
        p.write_text(f"x = {i}\n" * (i + 1))
        small.append(p)
    calls = []

    def files():
        calls.append(1)
        return small

    monkeypatch.setattr(corpus_module, "default_corpus_files", files)
    cache = tmp_path / "cache"
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_corpus("byte", cache)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(calls) == 1
    assert read_all(results[0]) == [utf8(p.read_text()) + [EOD] for p in small]
    leftovers = [n for n in os.listdir(cache) if n.endswith(".tmp")]
    assert leftovers == []
