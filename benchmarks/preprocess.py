"""Preprocessing throughput: ``yuanlfa-preprocess`` tokenizing the embedded corpus, by workers.

The input is one JSON-lines file holding the embedded default corpus (the stdlib sources of
``yuanlfa.data.default_corpus_files``, one record per file) --repeat times over, about 7.9 MB a
copy. JSON lines rather than text files because the tool splits a .jsonl file into 1 MB tasks for
its workers, while a text file is one task (one concatenated text file could not use a second
worker). For each tokenizer and worker count the whole ``preprocess_files`` call is timed, from
the call to the finished .bin/.idx pair on disk (pool start-up included), median of --repeats:
  - byte: the built-in byte tokenizer;
  - sentencepiece: a BPE model (--spm-vocab pieces) trained first, untimed, with
    ``yuanlfa.data.spm.train_sentencepiece`` on one copy of the corpus; skipped without the
    sentencepiece package.
Timed in-process (the library function the CLI calls, progress bar off), so interpreter start-up
and imports are not counted. The CPU time of the main process and of the pool workers is recorded
too (medians): unlike the wall time it does not suffer from other load on a shared machine, and
its sum against the 1-worker time shows the cost of handing work to the pool. Every worker count
must give the same .bin (checked by hash). MB are 10^6 bytes of the .jsonl input.

    python benchmarks/preprocess.py                # repeat 4 (~31 MB), workers 1 and 2
    python benchmarks/preprocess.py --out benchmarks/results/preprocess_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _env import cpu_name, package_version  # benchmarks/ is on sys.path when a script runs

from yuanlfa.data import Tokenizer, build_tokenizer, default_corpus_files, preprocess_files
from yuanlfa.data.spm import train_sentencepiece

MB = 1e6


def write_input(path: Path, repeat: int) -> int:
    """Write the corpus ``repeat`` times as JSON lines; returns the UTF-8 bytes of the texts."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in default_corpus_files()]
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(repeat):
            for text in texts:
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return repeat * sum(len(t.encode("utf-8")) for t in texts)


def train_spm(workdir: Path, vocab_size: int) -> str:
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in default_corpus_files())
    model = train_sentencepiece(texts, workdir / "spm", vocab_size=vocab_size, force=True)
    return f"sentencepiece:{model}"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its reaped children (pool workers)."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def run_case(src: Path, prefix: Path, tok: Tokenizer, workers: int, repeats: int) -> dict:
    times, main_cpu, worker_cpu, stats = [], [], [], {}
    for _ in range(repeats):
        for ext in (".bin", ".idx"):
            Path(f"{prefix}{ext}").unlink(missing_ok=True)
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        stats = preprocess_files([src], prefix, tok, workers=workers, progress=False)
        times.append(time.perf_counter() - started)
        cpu_after = cpu_seconds()
        main_cpu.append(cpu_after[0] - cpu_before[0])
        worker_cpu.append(cpu_after[1] - cpu_before[1])
    seconds = statistics.median(times)
    mb_per_s = stats["bytes"] / MB / seconds
    return {
        "workers": workers,
        "input_mb": round(stats["bytes"] / MB, 2),
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "seconds": round(seconds, 3),
        "seconds_all": [round(t, 3) for t in times],
        "mb_per_s": round(mb_per_s, 2),
        "mb_per_s_per_worker": round(mb_per_s / workers, 2),
        "tokens_per_s": round(stats["tokens"] / seconds),
        # CPU time does not depend on other load on the machine, unlike the wall time.
        "main_cpu_s": round(statistics.median(main_cpu), 3),
        "workers_cpu_s": round(statistics.median(worker_cpu), 3),
        "bin_sha256": sha256(f"{prefix}.bin"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=4, help="copies of the corpus in the input")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median counts")
    p.add_argument(
        "--tokenizers",
        nargs="+",
        choices=["byte", "sentencepiece"],
        default=["byte", "sentencepiece"],
        help="sentencepiece is skipped when the package is missing",
    )
    p.add_argument("--spm-vocab", type=int, default=4000, help="pieces of the trained model")
    p.add_argument("--workdir", help="keep the input, model and outputs here (default: a temp dir)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    # The machine may be shared: the load around the run says how far to trust the scaling.
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="yuanlfa-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        src = workdir / "corpus.jsonl"
        text_bytes = write_input(src, args.repeat)
        specs, skipped = {}, {}
        for name in args.tokenizers:
            if name == "byte":
                specs[name] = "byte"
            elif package_version("sentencepiece") is None:
                skipped[name] = "the sentencepiece package is not installed"
            else:
                specs[name] = train_spm(workdir, args.spm_vocab)

        rows = []
        print(
            f"{'tokenizer':>13} {'workers':>7} {'input MB':>8} {'s':>7} {'MB/s':>7} "
            f"{'MB/s/worker':>11} {'tokens/s':>11} {'x 1 worker':>10} {'CPU s main':>10} "
            f"{'CPU s workers':>13}"
        )
        for name, spec in specs.items():
            tok = build_tokenizer(spec)
            case_rows = []
            for workers in args.workers:
                row = run_case(src, workdir / f"out-{name}", tok, workers, args.repeats)
                case_rows.append({"tokenizer": name, **row})
            # Throughput relative to one worker, where one was measured.
            base = next((r["mb_per_s"] for r in case_rows if r["workers"] == 1), None)
            for row in case_rows:
                row["speedup_vs_1_worker"] = round(row["mb_per_s"] / base, 2) if base else None
                print(
                    f"{name:>13} {row['workers']:>7} {row['input_mb']:>8.2f} "
                    f"{row['seconds']:>7.3f} {row['mb_per_s']:>7.2f} "
                    f"{row['mb_per_s_per_worker']:>11.2f} {row['tokens_per_s']:>11,} "
                    f"{row['speedup_vs_1_worker'] or float('nan'):>10.2f} "
                    f"{row['main_cpu_s']:>10.3f} {row['workers_cpu_s']:>13.3f}"
                )
            if len({r["bin_sha256"] for r in case_rows}) != 1:
                raise SystemExit(f"{name}: the worker counts wrote different .bin files")
            rows.extend(case_rows)
        for name, why in skipped.items():
            print(f"{name}: skipped ({why})")

    if args.out:
        payload = {
            "benchmark": "preprocess",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": cpu_name(),
            "cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sentencepiece": package_version("sentencepiece"),
            "yuanlfa": package_version("yuanlfa"),
            "input": {
                "format": "jsonl, one record per corpus file",
                "corpus_files": len(default_corpus_files()),
                "repeat": args.repeat,
                "text_mb": round(text_bytes / MB, 2),
            },
            "spm_vocab": args.spm_vocab if "sentencepiece" in specs else None,
            "repeats": args.repeats,
            "timing": "median of repeats, in-process preprocess_files call incl. pool start and "
            "writing .bin/.idx; MB = 1e6 bytes of the .jsonl input",
            "skipped": skipped,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
