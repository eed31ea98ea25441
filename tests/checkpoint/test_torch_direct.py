"""torch.save files read through their zip directory (checkpoint/torch_direct.py) give what
torch.load gives, slices included; the allow-list still refuses crafted pickles; damaged and
legacy files are handled; the writers' prefetch keeps order, errors and its memory budget."""

from __future__ import annotations

import argparse
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.prefetch import Prefetcher
from yuanlfa.checkpoint.torch_direct import TorchFile
from yuanlfa.checkpoint.torch_files import Pending, load_untrusted, save_streaming


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 10, generator=g).to(torch.bfloat16)
    flat = torch.randn(100, generator=g)
    return {
        "args": argparse.Namespace(hidden_size=10, blocks=[1, 2]),
        "model": {
            "w": base,
            "t": torch.randn(6, 5, generator=g).t(),  # stored transposed: not contiguous
            "ids": torch.arange(11, dtype=torch.int64),
            "scalar": torch.tensor(3.0),
        },
        # Views of one storage (a flat buffer): offsets into a shared record.
        "views": [flat[10:40].view(5, 6), flat[50:60]],
        "rng": {"np": np.random.RandomState(3).get_state(), "py": random.Random(1).getstate()},
    }


def _walk(a, b, check) -> None:
    if isinstance(a, dict):
        for key in a:
            _walk(a[key], b[key], check)
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            _walk(x, y, check)
    elif isinstance(a, torch.Tensor):
        check(a, b)


@pytest.mark.parametrize("legacy", [False, True])
def test_tensors_and_slices_read_as_torch_load_gives_them(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "f.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=not legacy)
    expected = load_untrusted(path)
    count = [0]

    with TorchFile(path) as f:
        assert f.direct is not legacy  # a legacy file falls back to torch.load
        assert f.obj["args"] == expected["args"]

        def check(lazy: torch.Tensor, want: torch.Tensor) -> None:
            assert torch.equal(f.read(lazy), want)
            for dim in range(lazy.dim()):  # row and column slices, into strided destinations
                if lazy.shape[dim] < 3:
                    continue
                dest = torch.zeros(want.shape, dtype=want.dtype).narrow(dim, 1, 2)
                f.read_into(lazy.narrow(dim, 1, 2), dest)
                assert torch.equal(dest, want.narrow(dim, 1, 2))
            count[0] += 1

        _walk(f.obj, expected, check)
    assert count[0] == 6


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"model": {"w": torch.ones(2)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*system"):
        TorchFile(path)
    assert not marker.exists()


def test_a_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        TorchFile(path)


def test_prefetch_keeps_order_errors_and_budget() -> None:
    sizes = {"a": 5, "b": 3, "c": 2, "d": 9, "e": 1}
    loaded: list[str] = []
    running = threading.Semaphore(1)

    def load(key: str) -> str:
        assert running.acquire(blocking=False), "two loads at once"
        try:
            loaded.append(key)
            if key == "e":
                raise ValueError("broken e")
            return key.upper()
        finally:
            running.release()

    prefetch = Prefetcher(list(sizes), load, sizes.__getitem__)
    assert prefetch.budget == 9
    assert [prefetch.get(k) for k in "abc"] == ["A", "B", "C"]
    # b + c fit: c was read ahead while b was in hand; c + d do not: d was not.
    assert loaded == ["a", "b", "c"]
    assert prefetch.get("a") == "A"  # out of order: read again, nothing lost
    with pytest.raises(ValueError, match="broken e"):
        prefetch.get("e")
    prefetch.close()


def test_streaming_writes_with_prefetch_give_the_files_torch_load_reads(tmp_path: Path) -> None:
    tensors = [torch.randn(n, 3) for n in (4, 50, 2, 9)]
    files = [
        ({"model": [Pending(t.shape, t.dtype, lambda t=t: t) for t in tensors[i::2]]},
         tmp_path / f"{i}.pt")
        for i in range(2)
    ]  # fmt: skip
    save_streaming(files)
    for i in range(2):
        got = load_untrusted(tmp_path / f"{i}.pt")["model"]
        assert all(torch.equal(a, b) for a, b in zip(got, tensors[i::2], strict=True))
