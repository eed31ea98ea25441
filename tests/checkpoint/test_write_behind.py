"""Write-behind (yuanlfa.checkpoint.write_behind): the bytes written are unchanged, write-back
is started chunk by chunk as the file grows, and at most about a chunk stays in flight."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from yuanlfa.checkpoint import write_behind
from yuanlfa.checkpoint.write_behind import DirectoryWriteBehind, WriteBehind

pytestmark = pytest.mark.skipif(write_behind._SFR is None, reason="needs Linux sync_file_range")
CHUNK = 1 << 16


def test_file_write_behind_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(CHUNK)
    with open(path, "wb") as f:
        behind = WriteBehind(path, chunk_bytes=CHUNK)
        starts = []
        for _ in range(5):
            f.write(data)
            f.flush()
            behind.advance()
            starts.append(behind.started)
        behind.close()
    assert starts == [CHUNK * (i + 1) for i in range(5)]  # each chunk started as it came
    assert behind.fd is None
    assert path.read_bytes() == data * 5


def test_directory_write_behind_bounds_what_is_in_flight(tmp_path: Path) -> None:
    behind = DirectoryWriteBehind(tmp_path, chunk_bytes=CHUNK)
    blobs = {}
    for i in range(6):
        behind.advance()
        assert sum(n for _, n in behind.in_flight[1:]) <= CHUNK
        blobs[f"__{i}_0.distcp"] = os.urandom(CHUNK // 2 + i)
        (tmp_path / f"__{i}_0.distcp").write_bytes(blobs[f"__{i}_0.distcp"])
        (tmp_path / f"__{i + 1}_0.distcp").touch()  # the next file, opened empty
    behind.advance()
    assert behind.seen == set(blobs)  # every complete file started, the empty one not
    behind.close()
    assert behind.in_flight == []
    for name, blob in blobs.items():
        assert (tmp_path / name).read_bytes() == blob
