"""Checkpoint conversion throughput and peak memory vs a plain file copy.

A randomly initialized Yuan 2.0 2B checkpoint (``configs/yuan2-2b.yaml``, bf16 weights, written in
our format tensor by tensor) is converted by ``yuanlfa-reshard`` the ways users convert: ours ->
Hugging Face and back, ours -> Megatron (tp 2, pp 2), Megatron -> ours, and Megatron (tp 2, pp 2)
-> Megatron (tp 1, pp 1). Each conversion runs in a fresh process; we measure its wall time and its
memory, next to ``cp -r`` of the conversion's own input (the floor: any conversion has to move
those bytes), run right before and right after each conversion (and after each of its
``--repeats``), as a shared disk's speed drifts within minutes: the ratio is the conversion's
median time over the median of its own copies. Copies and conversions alike start from an
emptied page cache (as root) with their input and the interpreter's files read once just
before, and are timed until their output is on disk
(``sync``), as the converters fsync what they write. The bytes written differ from the copy's
where the format does (HF stores the tied head's copy): ``output_vs_input_bytes`` says by how
much. Memory is reported two ways: the kernel's peak resident set (VmHWM, which also counts
pages of memory-mapped input files, reclaimable page cache) and the peak anonymous memory (RssAnon,
sampled every 5 ms: what the process really allocates), both above the baseline of a process that
imports the same modules. Targets (issues #7, #19): time within 2x the copy; peak anonymous memory
at most 2x the largest tensor (the embedding), also stated in GiB.

    python benchmarks/reshard.py                      # 2B; needs ~25 GB of free disk
    python benchmarks/reshard.py --config configs/tiny.yaml --out /tmp/r.json   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _env import cpu_name  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME, TARGET_MEMORY = 2.0, 2.0


def make_checkpoint(config: str, out: Path) -> tuple[int, int]:
    """A random bf16 checkpoint in our format, one tensor in memory at a time. Returns (bytes of
    weights, bytes of the largest tensor)."""
    import torch

    from yuanlfa.checkpoint import TrainingState
    from yuanlfa.checkpoint.blocks import LazyTensor
    from yuanlfa.checkpoint.convert.common import write_ours
    from yuanlfa.checkpoint.manifest import model_key
    from yuanlfa.config import config_to_dict, load_config, resolve
    from yuanlfa.data import build_tokenizer
    from yuanlfa.model import build_model

    full = load_config(config)
    cfg = resolve(full, 1, build_tokenizer(full.data.tokenizer).vocab_size).model
    tensors = []
    total = largest = 0
    for name, p in build_model(cfg).named_parameters():

        def load(shape=tuple(p.shape)) -> torch.Tensor:
            return (torch.randn(shape) * cfg.init_std).to(torch.bfloat16)

        tensors.append(LazyTensor(model_key(name), tuple(p.shape), torch.bfloat16, load))
        total += p.numel() * 2
        largest = max(largest, p.numel() * 2)
    state = TrainingState(1, 0, config_to_dict(cfg), {})
    layout = {"source": "benchmarks/reshard.py (random weights)"}
    write_ours(out, tensors, state, layout, None, force=False, progress=False)
    return total, largest


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(cmd: list[str]) -> dict:
    """Wall time, peak VmHWM and peak sampled RssAnon of one process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    os.sync()  # start clean: no writeback of earlier cases in this one's time
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"anon": 0, "hwm": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak["anon"] = max(peak["anon"], _status_kib(proc.pid, "RssAnon"))
                peak["hwm"] = max(peak["hwm"], _status_kib(proc.pid, "VmHWM"))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    os.sync()  # durable output, as the converters guarantee (they fsync); cp alone does not
    wall = time.perf_counter() - started
    done.set()
    thread.join()
    if proc.returncode != 0:
        sys.stderr.write(output.decode()[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {
        "wall_s": wall,
        "peak_rss_bytes": peak["hwm"] * 1024,
        "peak_anon_bytes": peak["anon"] * 1024,
    }


def drop_caches() -> bool:
    """Empty the page cache (root on Linux); False where not allowed."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "yuan2-2b.yaml"))
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each conversion, each followed by a copy of its input (median reported)",
    )
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="yuanlfa-reshard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "ours"
    py = sys.executable
    reshard = [py, "-m", "yuanlfa.cli.reshard", "--quiet"]
    try:
        print(f"writing a random checkpoint of {args.config} into {src} ...", flush=True)
        weight_bytes, largest = make_checkpoint(args.config, src)
        print(f"  {weight_bytes / 2**30:.2f} GiB of weights, largest tensor "
              f"{largest / 2**20:.0f} MiB", flush=True)  # fmt: skip
        # Warm the page cache the same way for everyone: read the source once.
        subprocess.run(["cat", *map(str, src.rglob("*.distcp"))], stdout=subprocess.DEVNULL)
        dropped = drop_caches()
        if not dropped:
            print("note: cannot empty the page cache here (not root): timings vary more")
        cases = {
            "cp -r + sync (floor)": (["cp", "-r", str(src), str(work / "copy")], work / "copy"),
            "ours -> hf": (
                [*reshard, "--input", str(src), "--output", str(work / "hf"), "--to", "hf"],
                work / "hf",
            ),
            "hf -> ours": (
                [*reshard, "--input", str(work / "hf"), "--output", str(work / "from_hf"), "--to",
                 "yuanlfa"],
                work / "from_hf",
            ),
            "ours -> megatron tp2 pp2": (
                [*reshard, "--input", str(src), "--output", str(work / "mega"), "--to",
                 "megatron", "--target-tp", "2", "--target-pp", "2"],
                work / "mega",
            ),
            "megatron tp2 pp2 -> ours": (
                [*reshard, "--input", str(work / "mega"), "--output", str(work / "back"), "--to",
                 "yuanlfa"],
                work / "back",
            ),
            "megatron tp2 pp2 -> megatron tp1 pp1": (
                [*reshard, "--input", str(work / "mega"), "--output", str(work / "mega1"), "--to",
                 "megatron", "--target-tp", "1", "--target-pp", "1"],
                work / "mega1",
            ),
        }  # fmt: skip
        results = {}
        copies = []  # every floor measured, in order

        def warm(path: Path) -> None:
            # Conversions and copies alike start from the same memory: the page cache emptied
            # where we may (else the kernel first reclaims what earlier runs left, which
            # measured up to 2x on either side), then their input and the interpreter's own
            # files read once.
            os.sync()
            drop_caches()
            files = [str(f) for f in path.rglob("*") if f.is_file()]
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
            subprocess.run([py, "-c", "import yuanlfa.cli.reshard, torch"], check=True)

        def copy_floor(path: Path) -> float:
            shutil.rmtree(work / "copy", ignore_errors=True)
            warm(path)
            wall = measure(["cp", "-r", str(path), str(work / "copy")])["wall_s"]
            shutil.rmtree(work / "copy", ignore_errors=True)
            os.sync()  # the deletion's write-back out of the next measurement
            copies.append(wall)
            return wall

        # The process every conversion starts with (interpreter, imports), from the same warm
        # cache as the conversions: the fixed cost taken out of `time_vs_copy_after_start`.
        warm(src)
        baseline = measure([py, "-c", "import yuanlfa.cli.reshard, torch"])
        for name, (cmd, output) in cases.items():
            print(f"{name} ...", flush=True)
            if "floor" in name:
                r = measure(cmd)
                r["output_bytes"] = dir_bytes(output)
                r["throughput_gb_s"] = weight_bytes / r["wall_s"] / 1e9
                copies.append(r["wall_s"])
                results[name] = r
                shutil.rmtree(output, ignore_errors=True)
                continue
            source = Path(cmd[cmd.index("--input") + 1])
            # Side by side: the copy of this conversion's own input right before and after
            # it (and between repeats), so that the disk's drift spoils no ratio.
            floors, runs = [copy_floor(source)], []
            for _ in range(args.repeats):
                shutil.rmtree(output, ignore_errors=True)
                warm(source)
                runs.append(measure(cmd))
                floors.append(copy_floor(source))
            r = min(runs, key=lambda x: x["wall_s"])  # peaks: the worst run's, below
            r = {**r, "wall_s": statistics.median(x["wall_s"] for x in runs)}
            for kind in ("rss", "anon"):
                r[f"peak_{kind}_bytes"] = max(x[f"peak_{kind}_bytes"] for x in runs)
                extra = r[f"peak_{kind}_bytes"] - baseline[f"peak_{kind}_bytes"]
                r[f"peak_{kind}_above_baseline_vs_largest_tensor"] = extra / largest
            r["runs_s"] = [x["wall_s"] for x in runs]
            r["input_bytes"] = dir_bytes(source)
            r["output_bytes"] = dir_bytes(output)
            # HF's output holds the tied head's copy besides the embedding: more bytes
            # written than the copy of its input writes.
            r["output_vs_input_bytes"] = r["output_bytes"] / r["input_bytes"]
            r["copy_floor_runs_s"] = floors
            r["copy_floor_s"] = statistics.median(floors)
            r["time_vs_copy"] = r["wall_s"] / r["copy_floor_s"]
            # The same without the interpreter's start and imports (the baseline process: a
            # fixed cost, about 2 s, whatever the checkpoint's size).
            r["time_vs_copy_after_start"] = (r["wall_s"] - baseline["wall_s"]) / r["copy_floor_s"]
            r["throughput_gb_s"] = weight_bytes / r["wall_s"] / 1e9
            results[name] = r
            if name == "hf -> ours":  # disk space
                shutil.rmtree(work / "hf", ignore_errors=True)
            if name in ("hf -> ours", "megatron tp2 pp2 -> ours"):
                shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(work / "copy", ignore_errors=True)
        first_copy = results["cp -r + sync (floor)"]
        first_copy["runs_s"] = copies
        copy_s = statistics.median(copies)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ncp -r + sync runs: {[round(x, 1) for x in first_copy['runs_s']]} s (median "
          f"{copy_s:.1f} s); each conversion is compared with the copies of its own input "
          "right before and after it")  # fmt: skip
    print(f"weights {weight_bytes / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"baseline process RSS {baseline['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(anon {baseline['peak_anon_bytes'] / 2**20:.0f} MiB)")  # fmt: skip
    print(f"{'case':40s} {'wall s':>8s} {'copy s':>7s} {'GB/s':>6s} {'x copy':>7s} "
          f"{'out/in':>6s} {'anon+':>7s} {'rss+':>7s} {'anon+ GiB':>9s}")  # fmt: skip
    for name, r in results.items():
        vs = r.get("time_vs_copy")
        anon = r.get("peak_anon_above_baseline_vs_largest_tensor")
        rss = r.get("peak_rss_above_baseline_vs_largest_tensor")
        floor, ratio = r.get("copy_floor_s", r["wall_s"]), r.get("output_vs_input_bytes")
        print(f"{name:40s} {r['wall_s']:8.1f} {floor:7.1f} {r['throughput_gb_s']:6.2f} "
              f"{'' if vs is None else f'{vs:7.2f}':>7s} "
              f"{'' if ratio is None else f'{ratio:6.2f}':>6s} "
              f"{'' if anon is None else f'{anon:7.2f}':>7s} "
              f"{'' if rss is None else f'{rss:7.2f}':>7s} "
              f"{'' if anon is None else f'{anon * largest / 2**30:9.2f}':>9s}")  # fmt: skip
    print(
        "(x copy: time / the median time of cp -r + sync of the conversion's input, measured "
        "right before and after it; out/in: bytes written / bytes of the input; anon+ / rss+: "
        "peak above the baseline process, in units of the largest tensor)"
    )
    conversions = {k: v for k, v in results.items() if "time_vs_copy" in v}
    worst_time = max(v["time_vs_copy"] for v in conversions.values())
    worst_anon = max(v["peak_anon_above_baseline_vs_largest_tensor"] for v in conversions.values())
    time_ok, mem_ok = worst_time <= TARGET_TIME, worst_anon <= TARGET_MEMORY
    print(f"time target (<= {TARGET_TIME}x copy): worst {worst_time:.2f}x: "
          f"{'met' if time_ok else 'NOT met'}")  # fmt: skip
    print(f"memory target (<= {TARGET_MEMORY}x the largest tensor = "
          f"{TARGET_MEMORY * largest / 2**30:.2f} GiB, anonymous memory above the baseline): "
          f"worst {worst_anon:.2f}x = {worst_anon * largest / 2**30:.2f} GiB: "
          f"{'met' if mem_ok else 'NOT met'}")  # fmt: skip

    if args.out:
        import torch

        import yuanlfa

        record = {
            "benchmark": "reshard",
            "config": os.path.relpath(args.config, ROOT),
            "device": cpu_name(),
            "cores": os.cpu_count(),
            "torch_version": torch.__version__,
            "yuanlfa_version": yuanlfa.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            # Other processes on the machine distort every timing here: say how busy it was.
            "load_average_at_end": os.getloadavg(),
            "page_cache_dropped_before_each_run": dropped,
            "copy_floor_s": copy_s,
            "weight_bytes": weight_bytes,
            "largest_tensor_bytes": largest,
            "baseline": baseline,
            "cases": results,
            "targets": {
                "time_vs_copy": TARGET_TIME,
                "memory_vs_largest_tensor": TARGET_MEMORY,
                "time_met": time_ok,
                "memory_met": mem_ok,
            },
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
