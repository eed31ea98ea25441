"""Building the packed dataset's sample index: the C++ extension vs numpy, side by side.

Documents get corpus-like lengths (log-normal, median about 660 tokens, mean about 1,400,
clipped to [1, 200,000]; int32 as in Megatron's .idx files) and are ordered as PackedDataset
does it: a seeded RandomState permutation per epoch (int32). Each case asks for as many samples
as one epoch holds. Timed, best of --repeats after a warm-up:
  - cpp: ``index_helpers.build_sample_index(impl="cpp")``, the compiled walk;
  - numpy: ``index_helpers.build_sample_index(impl="numpy")``, the same checks then the numpy
    code of ``yuanlfa.data.dataset.build_sample_index``;
  - numpy_raw: that dataset.py function alone (what PackedDataset calls, without the wrapper's
    document-id and length checks).
Both results are checked equal before timing. Needs the extension: ``pip install -e .`` with a C++
compiler.

    python benchmarks/sample_index.py            # 1e8 tokens at seq 4096, 1e9 tokens at seq 2048
    python benchmarks/sample_index.py --out benchmarks/results/sample_index_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _env import cpu_name, package_version  # benchmarks/ is on sys.path when a script runs

from yuanlfa.data.index_helpers import BUILD_HINT, build_sample_index, have_cpp
from yuanlfa.data.sample_index import build_sample_index as numpy_raw


def corpus(tokens: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document lengths holding about ``tokens`` tokens and one epoch's order of them."""
    rng = np.random.default_rng(seed)
    mean = np.exp(6.5 + 1.2**2 / 2)
    num_docs = max(1, int(tokens / mean))
    lengths = np.clip(rng.lognormal(6.5, 1.2, size=num_docs), 1, 200_000).astype(np.int32)
    order = np.random.RandomState(seed).permutation(num_docs).astype(np.int32)
    return lengths, order


def best_time(fn: Callable[[], np.ndarray], repeats: int) -> float:
    fn()  # warm-up: page in the arrays, load code
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def run_case(tokens: float, seq_length: int, repeats: int, seed: int) -> dict:
    lengths, order = corpus(tokens, seed)
    total = int(lengths[order].sum())
    num = (total - 1) // seq_length
    cpp = build_sample_index(lengths, order, seq_length, num, impl="cpp")
    np.testing.assert_array_equal(
        cpp, build_sample_index(lengths, order, seq_length, num, impl="numpy")
    )
    t_cpp = best_time(lambda: build_sample_index(lengths, order, seq_length, num, "cpp"), repeats)
    t_np = best_time(lambda: build_sample_index(lengths, order, seq_length, num, "numpy"), repeats)
    t_raw = best_time(lambda: numpy_raw(lengths, order, seq_length, num), repeats)
    return {
        "tokens": total,
        "documents": len(lengths),
        "seq_length": seq_length,
        "num_samples": num,
        "cpp_ms": t_cpp * 1e3,
        "numpy_ms": t_np * 1e3,
        "numpy_raw_ms": t_raw * 1e3,
        "numpy_over_cpp": t_np / t_cpp,
        "numpy_raw_over_cpp": t_raw / t_cpp,
    }


def parse_case(text: str) -> tuple[float, int]:
    tokens, seq = text.split(":")
    return float(tokens), int(seq)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases",
        type=parse_case,
        nargs="+",
        default=[(1e8, 4096), (1e9, 2048)],
        help="TOKENS:SEQ_LENGTH pairs, e.g. 1e8:4096",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best counts")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if not have_cpp():
        print(f"the C++ extension is not built; {BUILD_HINT}", file=sys.stderr)
        return 1

    rows = []
    print(
        f"{'tokens':>14} {'seq':>5} {'samples':>8} {'cpp ms':>8} {'numpy ms':>9} "
        f"{'raw ms':>8} {'numpy/cpp':>9} {'raw/cpp':>8}"
    )
    for tokens, seq_length in args.cases:
        row = run_case(tokens, seq_length, args.repeats, args.seed)
        rows.append(row)
        print(
            f"{row['tokens']:>14,} {seq_length:>5} {row['num_samples']:>8} "
            f"{row['cpp_ms']:>8.2f} {row['numpy_ms']:>9.2f} {row['numpy_raw_ms']:>8.2f} "
            f"{row['numpy_over_cpp']:>9.1f} {row['numpy_raw_over_cpp']:>8.1f}"
        )
    if args.out:
        payload = {
            "benchmark": "sample_index",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": cpu_name(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pybind11": package_version("pybind11"),
            "yuanlfa": package_version("yuanlfa"),
            "repeats": args.repeats,
            "timing": "best of repeats, after one warm-up; single thread",
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
