"""File-to-file copies of converted tensors (checkpoint/file_copy.py): the kernel copy, the
read/write fallback (forced, and when the kernel refuses) and the tensors-in-memory path give
the same bytes, and the HF export through each is identical to the export that reads every
tensor. The HF import's no-copy view of back-to-back parts equals the concatenation."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from tests.checkpoint.test_yuan_formats import RUN, _checkpoint, _model, _model_cfg
from yuanlfa.checkpoint import dcp_direct, file_copy, latest_checkpoint, manifest, storage
from yuanlfa.checkpoint.convert import export_hf, hf, import_hf
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import FileRange, OutputFile
from yuanlfa.checkpoint.planners import LazySavePlanner
from yuanlfa.checkpoint.storage import read_tensor
from yuanlfa.checkpoint.stored import Block, Part, Ranges


def _refuse(*args, **kwargs):
    raise OSError(errno.EXDEV, "Invalid cross-device link")


@pytest.fixture(params=["kernel", "forced fallback", "kernel refuses"])
def copy_mode(request, monkeypatch):
    if request.param == "forced fallback":
        monkeypatch.setattr(file_copy, "KERNEL_COPY", False)
    elif request.param == "kernel refuses":
        monkeypatch.setattr(file_copy.os, "copy_file_range", _refuse, raising=False)
        monkeypatch.setattr(file_copy, "KERNEL_COPY", True)
    elif not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")
    return request.param


def test_ranges_and_tensors_are_appended_exactly(tmp_path: Path, copy_mode, monkeypatch) -> None:
    monkeypatch.setattr(file_copy, "_FALLBACK_CHUNK", 1000)  # several buffer rounds
    src = tmp_path / "src"
    data = os.urandom(10_000)
    src.write_bytes(data)
    tensor = torch.arange(300, dtype=torch.bfloat16).reshape(3, 100)
    with OutputFile(tmp_path / "out") as f:
        f.write(b"head")
        f.copy(FileRange(src, 17, 4321))
        f.write(tensor[1:])  # a contiguous view: its own bytes only
        f.copy(FileRange(src, 0, 0))
        f.copy(FileRange(src, 9000, 1000))
    rows = tensor[1:].view(torch.int16).numpy().tobytes()
    expected = b"head" + data[17:4338] + rows + data[9000:]
    assert (tmp_path / "out").read_bytes() == expected


def test_runs_of_small_ranges_are_gathered_exactly(tmp_path: Path, monkeypatch) -> None:
    """copy_all: runs of small ranges (a column block's rows) from two files, more than one
    pwritev takes, between large ones, with the kernel writing less than asked at times; a
    range past a file's end is named as a truncation."""
    monkeypatch.setattr(file_copy, "SMALL_RANGE", 64)
    monkeypatch.setattr(file_copy, "_IOV_MAX", 7)
    real = os.pwritev

    def short_pwritev(fd, buffers, offset):  # at most 100 bytes a call, cutting buffers
        taken, left = [], 100
        for b in buffers:
            taken.append(memoryview(b)[:left])
            left -= taken[-1].nbytes
            if not left:
                break
        return real(fd, taken, offset)

    monkeypatch.setattr(file_copy.os, "pwritev", short_pwritev)
    a, b = tmp_path / "a", tmp_path / "b"
    data = {a: os.urandom(5000), b: os.urandom(3000)}
    for path, content in data.items():
        path.write_bytes(content)
    ranges = [FileRange(a if i % 3 else b, 37 * i, 1 + i % 40) for i in range(50)]
    ranges[20:20] = [FileRange(a, 100, 2000), FileRange(b, 5, 0)]
    with OutputFile(tmp_path / "out") as f:
        f.copy_all(ranges)
    expected = b"".join(data[r.path][r.offset : r.offset + r.nbytes] for r in ranges)
    assert (tmp_path / "out").read_bytes() == expected
    with pytest.raises(CheckpointError, match="truncated"), OutputFile(tmp_path / "o") as f:
        f.copy_all([FileRange(b, 0, 10), FileRange(b, 2995, 10)])


@pytest.mark.parametrize("gather", ["pwritev", "no pwritev"])
def test_blocks_of_rows_are_gathered_exactly(tmp_path: Path, monkeypatch, gather) -> None:
    """copy_all of :class:`Ranges` (a column block of two parts from two files over more rows
    than one pwritev takes, a row block, a block of one short row) and the CRC's views of
    them: the same bytes as the ranges listed one by one; a block reaching past a file's end
    is named as a truncation."""
    monkeypatch.setattr(file_copy, "SMALL_RANGE", 64)
    monkeypatch.setattr(file_copy, "_IOV_MAX", 7)
    if gather == "no pwritev":
        monkeypatch.delattr(file_copy.os, "pwritev")
    a, b = tmp_path / "a", tmp_path / "b"
    data = {a: os.urandom(5000), b: os.urandom(3000)}
    for path, content in data.items():
        path.write_bytes(content)
    ranges = Ranges(
        [
            Block(23, (Part(a, 10, 100, 30), Part(b, 7, 90, 12))),  # a column block
            Block(2, (Part(a, 2500, 1000, 1000),)),  # two long rows
            Block(1, (Part(b, 2990, 0, 10),)),
        ]
    )
    expected = b"".join(data[r.path][r.offset : r.offset + r.nbytes] for r in ranges)
    assert len(list(ranges)) == 23 * 2 + 2 + 1
    with OutputFile(tmp_path / "out") as f:
        f.copy_all(ranges)
    assert (tmp_path / "out").read_bytes() == expected
    maps = file_copy.SourceMaps()
    batches = list(maps.batches(ranges))
    assert all(len(batch) <= 7 for batch in batches)
    assert b"".join(bytes(v) for batch in batches for v in batch) == expected
    del batches
    maps.close()
    past_end = Ranges([Block(3, (Part(b, 0, 1000, 10), Part(b, 995, 1000, 10)))])
    with pytest.raises(CheckpointError, match="truncated"), OutputFile(tmp_path / "o") as f:
        f.copy_all(past_end)


def test_sources_held_open_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """A source checkpoint may hold a file per tensor and an output file take ranges from
    thousands: at most OPEN_SOURCES descriptors and maps are held (least recently used one
    closed), and the bytes are the same."""
    monkeypatch.setattr(file_copy, "OPEN_SOURCES", 2)
    monkeypatch.setattr(file_copy, "SMALL_RANGE", 64)
    files = {tmp_path / f"t{i}": os.urandom(500) for i in range(5)}
    for path, content in files.items():
        path.write_bytes(content)
    paths = list(files)
    ranges = [FileRange(paths[i % 5], i, 100 if i % 2 else 10) for i in range(40)]
    with OutputFile(tmp_path / "out") as f:
        for start in range(0, 40, 4):
            f.copy_all(ranges[start : start + 4])
            assert len(f._sources) <= 2 and len(f._maps._maps) <= 2
    expected = b"".join(files[r.path][r.offset : r.offset + r.nbytes] for r in ranges)
    assert (tmp_path / "out").read_bytes() == expected


def test_a_short_source_is_named(tmp_path: Path, copy_mode) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="truncated"), OutputFile(tmp_path / "o") as f:
        f.copy(FileRange(src, 50, 100))


@pytest.mark.parametrize("tied", [True, False])
def test_hf_export_by_file_copy_equals_the_export_that_reads(
    tmp_path: Path, copy_mode, tied, monkeypatch
) -> None:
    cfg = _model_cfg(tie_embeddings=tied)
    model = _model(cfg).to(torch.bfloat16)
    src = _checkpoint(tmp_path / "ours", cfg, model, RUN)
    # Small shards: several files, each synced after the next is written.
    copied = export_hf(src, tmp_path / "copied", max_shard_bytes=2**20, progress=False)
    with monkeypatch.context() as m:  # every tensor read into memory and written from it
        m.setattr(hf.dcp_direct, "stored", lambda path, key: None)
        read = export_hf(src, tmp_path / "read", max_shard_bytes=2**20, progress=False)
    files = sorted(p.name for p in read.glob("*.safetensors"))
    assert files == sorted(p.name for p in copied.glob("*.safetensors")) and len(files) > 1
    for name in files:
        assert (copied / name).read_bytes() == (read / name).read_bytes(), name
    # And what safetensors reads is the model's parameters, rows split as the format says.
    tensors = {}
    for name in files:
        tensors |= load_file(copied / name)
    assert torch.equal(tensors["model.embed_tokens.weight"], model.embed.weight)
    head = model.embed.weight if tied else model.output.weight
    assert torch.equal(tensors["lm_head.weight"], head)
    qk = model.layers["1"].attn.qk_proj.weight
    q, k = (
        tensors["model.layers.1.self_attn.q_proj.weight"],
        tensors["model.layers.1.self_attn.k_proj.weight"],
    )
    assert torch.equal(torch.cat([q, k]), qk)


def test_hf_export_with_another_dtype_reads_and_casts(tmp_path: Path) -> None:
    cfg = _model_cfg()
    model = _model(cfg).to(torch.bfloat16)
    src = _checkpoint(tmp_path / "ours", cfg, model, RUN)
    out = export_hf(src, tmp_path / "hf", dtype=torch.float32, progress=False)
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors |= load_file(file)
    assert tensors["model.norm.weight"].dtype == torch.float32
    assert torch.equal(tensors["model.norm.weight"], model.final_norm.weight.float())


def test_hf_import_writes_back_to_back_parts_without_a_copy(tmp_path: Path, monkeypatch) -> None:
    """Our export's q / k and up / gate lie back to back: the import hands the writer one view
    over the file's pages; the result equals the import that concatenates copies, and the
    model's parameters."""
    cfg = _model_cfg()
    model = _model(cfg).to(torch.bfloat16)
    out = export_hf(
        _checkpoint(tmp_path / "ours", cfg, model, RUN), tmp_path / "hf", progress=False
    )
    reader = hf._HFReader(out)
    names = [n for n, _ in hf.hf_parts("layers.0.mlp.fc1.weight", cfg)]
    view = reader.rows(names)
    assert view is not None and view.untyped_storage().nbytes() == view.numel() * 2
    assert reader.rows(list(reversed(names))) is None  # not back to back in that order
    direct = import_hf(out, tmp_path / "direct", force=False, progress=False)
    with monkeypatch.context() as m:
        m.setattr(hf._HFReader, "rows", lambda self, names: None)
        copied = import_hf(out, tmp_path / "copied", force=False, progress=False)
    a, b = latest_checkpoint(direct), latest_checkpoint(copied)
    for name, p in model.named_parameters():
        key = manifest.model_key(name)
        assert torch.equal(read_tensor(a, key), p.detach()), name
        assert torch.equal(read_tensor(b, key), p.detach()), name


def _dcp_save(directory: Path, planner: LazySavePlanner) -> None:
    """DCP's own writer, planned by ``planner`` (ours writes one chunk per tensor)."""
    writer = dcp.FileSystemWriter(directory, single_file_per_rank=False)
    with storage.quiet_single_process():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)


class _SplitPlanner(LazySavePlanner):
    """Stores each matrix as two chunks, split along ``dim`` (as a sharded run stores its
    column- and row-parallel weights)."""

    dim = 0

    def create_local_plan(self) -> SavePlan:
        items = []
        for t in self.tensors.values():
            bounds = [(0, t.shape[0])] if len(t.shape) < 2 else None
            if bounds is None:
                n = t.shape[self.dim]
                # Uneven: an HF tensor (q of [q; k], up of fc1) spans both chunks.
                bounds = [(0, n // 3), (n // 3, n - n // 3)]
            for start, length in bounds:
                offsets, sizes = [0] * len(t.shape), list(t.shape)
                if len(t.shape) >= 2:
                    offsets[self.dim], sizes[self.dim] = start, length
                items.append(
                    WriteItem(
                        index=MetadataIndex(t.key, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                            properties=TensorProperties(dtype=t.dtype),
                            size=torch.Size(t.shape),
                        ),
                    )
                )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        whole = self.tensors[write_item.index.fqn].load()
        chunk = write_item.tensor_data.chunk
        for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            whole = whole.narrow(dim, start, length)
        return whole.contiguous().clone()


@pytest.mark.parametrize("dim", [0, 1])
def test_hf_export_of_a_checkpoint_stored_in_chunks(tmp_path: Path, dim, monkeypatch) -> None:
    """Row blocks (tp's column-parallel weights): a tensor's rows span two chunks, copied range
    by range; column blocks (row-parallel weights): not contiguous, read. Both as exported
    from a checkpoint stored whole."""
    cfg = _model_cfg()
    model = _model(cfg).to(torch.bfloat16)
    whole = export_hf(
        _checkpoint(tmp_path / "whole", cfg, model, RUN), tmp_path / "a", progress=False
    )
    planner = type("Split", (_SplitPlanner,), {"dim": dim})
    with monkeypatch.context() as m:
        m.setattr(storage, "save_lazy", lambda d, tensors: _dcp_save(d, planner(tensors)))
        split = _checkpoint(tmp_path / "split", cfg, model, RUN)
    path = latest_checkpoint(split)
    key = manifest.model_key("layers.0.mlp.fc1.weight")
    assert len(storage.stored_tensors(path)[key].chunks) == 2
    ranges = dcp_direct.row_ranges(path, key)
    assert (ranges is not None) == (dim == 0)
    out = export_hf(split, tmp_path / "b", progress=False)
    for name in sorted(p.name for p in whole.glob("*.safetensors")):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's sync_file_range")
def test_write_back_reaches_the_kernel(tmp_path: Path) -> None:
    """Python's os has no sync_file_range: the call goes to libc (it was once a silent no-op
    behind a hasattr test). A real call succeeds on an open file and fails on a closed one."""
    call = file_copy._sync_file_range()
    assert call is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 10_000)
        assert call(fd, 0, 0, file_copy._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)
    assert call(fd, 0, 0, file_copy._SYNC_FILE_RANGE_WRITE) == -1  # EBADF: it ran
