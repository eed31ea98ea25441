"""Direct reads of stored byte ranges give exactly what DCP's own reader gives, for every way a
tensor is split into blocks (rows, columns, flat ranges of the distributed optimizer), every
dtype; anything the direct path does not recognise goes through DCP's reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import yuanlfa.checkpoint.dcp_direct as direct
from yuanlfa.checkpoint import CheckpointError, storage
from yuanlfa.checkpoint.blocks import Block, flat_range_blocks
from yuanlfa.checkpoint.planners import BlockSavePlanner


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    blocks = []
    for key, t in tensors.items():
        if t.dim() == 2 and key.endswith("cols"):  # tp column shards
            half = t.shape[1] // 2
            blocks += [
                Block(key, tuple(t.shape), (0, 0), t[:, :half].contiguous()),
                Block(key, tuple(t.shape), (0, half), t[:, half:].contiguous()),
            ]
        elif key.endswith("flat"):  # two dp ranks' slices of a flat buffer
            cut = t.numel() // 3 + 1
            for lo, hi in ((0, cut), (cut, t.numel())):
                for off, sizes, f in flat_range_blocks(tuple(t.shape), lo, hi):
                    view = t.reshape(-1)[f : f + int(torch.Size(sizes).numel())].view(sizes)
                    blocks.append(Block(key, tuple(t.shape), off, view.clone()))
        else:
            blocks.append(Block(key, tuple(t.shape), (0,) * t.dim(), t))
    with storage.quiet_single_process():
        dcp.save(
            {},
            storage_writer=dcp.FileSystemWriter(path),
            planner=BlockSavePlanner(blocks),
            no_dist=True,
        )


TENSORS = {
    "embed.rows": torch.randn(50, 12).to(torch.bfloat16),
    "proj.cols": torch.randn(7, 10),
    "moment.flat": torch.randn(9, 11, dtype=torch.float64),
    "norm": torch.randn(13).half(),
    "scalar": torch.tensor(3.5),
}


def test_direct_reads_equal_dcp_reads(tmp_path: Path, monkeypatch) -> None:
    _save(tmp_path, TENSORS)
    want = {k: storage.read_tensor(tmp_path, k) for k in TENSORS}

    def no_fallback(*_):
        raise AssertionError("fell back to DCP's reader")

    monkeypatch.setattr(storage, "read_tensor", no_fallback)
    for key, t in TENSORS.items():
        got = direct.read_tensor(tmp_path, key)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, want[key]) and torch.equal(got, t), key


def test_unrecognised_storage_goes_through_dcp(tmp_path: Path, monkeypatch) -> None:
    _save(tmp_path, TENSORS)

    def odd(*_):
        raise direct._NotDirect("as if compressed")

    monkeypatch.setattr(direct, "_storage_span", odd)
    for key, t in TENSORS.items():
        assert torch.equal(direct.read_tensor(tmp_path, key), t)


def test_truncated_file_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path, {"embed.rows": TENSORS["embed.rows"]})
    (data,) = tmp_path.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    # Found when the metadata is read (storage's size check), or by the direct read itself.
    with pytest.raises(CheckpointError, match=rf"{data}: .*(metadata needs|shorter than)"):
        direct.read_tensor(tmp_path, "embed.rows")
