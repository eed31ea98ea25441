"""Our writers of torch's file formats (checkpoint/torch_zip.py, checkpoint/dcp_write.py) against
the outside readers: what ``torch.load`` (plain and memory-mapped), Python's ``zipfile`` (CRCs
checked) and ``unzip -t`` read from our ``torch.save`` archives, Zip64 included; our DCP
directories against DCP's own writer (the same metadata) and DCP's own reader; and the
conversions that copy stored bytes file to file against the same conversions reading every
tensor into memory."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.checkpoint.test_yuan_formats import RUN, _checkpoint, _model, _model_cfg
from yuanlfa.checkpoint import dcp_direct, latest_checkpoint, manifest, storage, torch_zip
from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.convert import (
    export_hf,
    export_megatron,
    import_hf,
    import_megatron,
    megatron,
)
from yuanlfa.checkpoint.convert.megatron import reshard_megatron
from yuanlfa.checkpoint.dcp_write import write_dcp
from yuanlfa.checkpoint.file_copy import FileRange
from yuanlfa.checkpoint.planners import LazySavePlanner
from yuanlfa.checkpoint.stored import Stored
from yuanlfa.checkpoint.torch_direct import TorchFile
from yuanlfa.checkpoint.torch_files import Pending, save_streaming


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(37, 11, generator=gen).to(torch.bfloat16),
        "b": torch.randn(5, generator=gen),
        "i": torch.arange(7, dtype=torch.int64),
        "s": torch.tensor(3.5),  # 0-d
        "e": torch.empty(0, 4),
    }


def _source_file(tmp: Path, tensor: torch.Tensor, lead: int) -> Path:
    path = tmp / f"src{lead}.bin"
    path.write_bytes(b"x" * lead + tensor.view(torch.uint8).numpy().tobytes())
    return path


def _equal_trees(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal_trees(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal_trees(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("zip64", [False, True])
def test_archives_read_back_everywhere(tmp_path: Path, zip64: bool, monkeypatch) -> None:
    if zip64:  # offsets and sizes past the (lowered) limit: the Zip64 records real files need
        monkeypatch.setattr(torch_zip, "_ZIP64_FROM", 300)
    t = _tensors()
    # The bf16 matrix from two source files (rows 0-19 and 20-36), at offsets on a 64-byte
    # boundary and off one.
    first, second = _source_file(tmp_path, t["w"][:20], 192), _source_file(tmp_path, t["w"][20:], 5)
    row = 11 * 2
    obj = {
        "args": argparse.Namespace(lr=0.1, name="x"),
        "iteration": 3,
        "model": {
            "w": Pending((37, 11), torch.bfloat16, None, source=[
                FileRange(first, 192, 20 * row), FileRange(second, 5, 17 * row)]),
            **{k: Pending(tuple(v.shape), v.dtype, lambda v=v: v)
               for k, v in t.items() if k != "w"},
        },
    }  # fmt: skip
    ours = tmp_path / "model_optim_rng.pt"
    save_streaming([(obj, ours)])
    expected = {"args": obj["args"], "iteration": 3, "model": t}
    for mmap in (False, True):
        _equal_trees(torch.load(ours, weights_only=False, mmap=mmap), expected)
    with zipfile.ZipFile(ours) as z:
        assert z.testzip() is None  # every CRC
        names = z.namelist()
        infos = {i.filename: i for i in z.infolist()}
        if zip64:
            assert any(i.header_offset >= 300 for i in infos.values())
    # The records torch.save writes for the same object, in its order.
    reference = tmp_path / "ref" / "model_optim_rng.pt"
    reference.parent.mkdir()
    torch.save(expected, reference)
    with zipfile.ZipFile(reference) as z:
        assert names == z.namelist()
    if shutil.which("unzip"):
        assert (
            "No errors"
            in subprocess.run(
                ["unzip", "-t", str(ours)], capture_output=True, text=True, check=True
            ).stdout
        )
    # Data 64-byte aligned, as torch.load(mmap=True) expects (copied or written).
    with TorchFile(ours) as f:
        assert f.range_of(f.obj["model"]["w"]).nbytes == 37 * row
        for key in ("w", "b", "i"):
            assert f.range_of(f.obj["model"][key]).offset % 64 == 0


def test_a_source_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    src = _source_file(tmp_path, torch.zeros(4, dtype=torch.bfloat16), 0)
    bad = {"w": Pending((5,), torch.bfloat16, None, source=[FileRange(src, 0, 8)])}
    with pytest.raises(Exception, match="source holds 8 bytes"):
        save_streaming([(bad, tmp_path / "o.pt")])


def test_a_failed_first_write_leaves_no_open_file(tmp_path: Path, monkeypatch) -> None:
    """A stream whose first records cannot be written (a full disk) closes its file: the
    caller never held it to abort it."""
    import errno
    import os

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    state = {"w": Pending((4,), torch.bfloat16, lambda: torch.zeros(4, dtype=torch.bfloat16))}
    save_streaming([(state, tmp_path / "warm.pt")])  # modules and pools set up beforehand
    before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(torch_zip, "write_header_records", full)
    with pytest.raises(OSError, match="No space"):
        save_streaming([(state, tmp_path / "a.pt"), (state, tmp_path / "b.pt")])
    assert sorted(os.listdir("/proc/self/fd")) == before


def _lazy(t: dict[str, torch.Tensor], rows: dict | None = None) -> list[LazyTensor]:
    return [
        LazyTensor(k, tuple(v.shape), v.dtype, lambda v=v: v.clone(), (rows or {}).get(k))
        for k, v in t.items()
    ]


def test_dcp_directory_matches_dcps_own_writer_and_reader(tmp_path: Path) -> None:
    t = _tensors()
    w = t["w"]
    src = _source_file(tmp_path, w, 100)  # rows copied from a file, 100 bytes in
    rows = {"w": Stored([FileRange(src, 100, 30 * 22), FileRange(src, 760, 7 * 22)])}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_dcp(ours, _lazy(t, rows))
    with storage.quiet_single_process():
        dcp.save(
            {},
            storage_writer=dcp.FileSystemWriter(theirs, single_file_per_rank=False),
            planner=LazySavePlanner(_lazy(t)),
            no_dist=True,
        )
    a = storage.storage_reader(ours).read_metadata()
    b = storage.storage_reader(theirs).read_metadata()
    assert a.state_dict_metadata == b.state_dict_metadata
    assert set(a.storage_data) == set(b.storage_data)
    assert a.planner_data == b.planner_data and a.version == b.version
    for key, value in t.items():
        assert torch.equal(storage.read_tensor(ours, key), value), key  # DCP's reader
        assert torch.equal(dcp_direct.read_tensor(ours, key), value), key
    # A plain DCP load (its own reader class, not ours) into a state dict.
    state = {k: torch.zeros_like(v) for k, v in t.items()}
    with storage.quiet_single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(ours), no_dist=True)
    _equal_trees(state, t)


def test_stored_bytes_that_do_not_fit_the_declared_shape_are_read_and_checked(
    tmp_path: Path,
) -> None:
    t = {"w": _tensors()["w"]}
    src = _source_file(tmp_path, t["w"], 0)
    # A location of too few bytes: not copied; the tensor is read instead.
    short = {"w": Stored([FileRange(src, 0, 36 * 22)])}
    write_dcp(tmp_path / "o", _lazy(t, short))
    assert torch.equal(dcp_direct.read_tensor(tmp_path / "o", "w"), t["w"])
    bad = [LazyTensor("w", (37, 11), torch.bfloat16, lambda: torch.zeros(11, 37))]
    with pytest.raises(Exception, match="the source gives"):
        write_dcp(tmp_path / "p", bad)


def test_stored_slices_rows_and_column_blocks() -> None:
    """A tensor's bytes over three ranges of two files, and in one range of a third (the
    usual case, taken without a search): row blocks and column blocks of it are the byte
    ranges the tensor's own slicing gives."""
    whole = torch.arange(6 * 4, dtype=torch.int16).reshape(6, 4)
    data = whole.view(torch.uint8).reshape(-1).numpy().tobytes()
    files = {Path("a"): b"..." + data[:20], Path("b"): data[20:30] + b"-" + data[30:]}
    files[Path("c")] = b"12345" + data
    split = Stored(
        [FileRange(Path("a"), 3, 20), FileRange(Path("b"), 0, 10), FileRange(Path("b"), 11, 18)]
    )
    one = Stored([FileRange(Path("c"), 5, len(data))])

    def read(ranges) -> bytes:
        return b"".join(files[r.path][r.offset : r.offset + r.nbytes] for r in ranges)

    for where in (split, one):
        assert read(where.ranges) == data
        for dim, pieces in [(0, [(0, 1, 3)]), (0, [(0, 0, 1), (1, 4, 2)]), (1, [(0, 1, 2)]),
                            (1, [(0, 0, 1), (1, 3, 1)])]:  # fmt: skip
            expect = torch.cat([whole.narrow(dim, start, n) for _, start, n in pieces], dim=dim)
            got = read(where.block((6, 4), 2, dim, pieces))
            assert got == expect.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    where = split
    assert where.block((6, 4), 2, 2, [(0, 0, 1)]) is None  # no third dim to split
    assert where.block((5, 4), 2, 0, [(0, 0, 5)]) is None  # another size


def _no_rows(monkeypatch) -> None:
    monkeypatch.setattr(megatron._Source, "ranges", lambda self, *a: None)
    monkeypatch.setattr(megatron.MegatronReader, "located", lambda self, *a: None)
    monkeypatch.setattr(import_hf.__globals__["_HFReader"], "located", lambda self, *a: None)


def _load_all(root: Path) -> dict:
    out = {}
    for f in sorted(root.rglob("*.pt")):
        state = torch.load(f, weights_only=False)
        out[str(f.relative_to(root))] = {k: state[k] for k in ("model", "iteration")}
    return out


def test_conversions_by_file_copy_equal_the_conversions_that_read(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = _model_cfg()
    model = _model(cfg).to(torch.bfloat16)
    src = _checkpoint(tmp_path / "ours", cfg, model, RUN)
    runs = {}
    copied = {"shards": 0, "hf": 0}  # copies the writers were given, in the copy run

    def counting(what, real):
        def wrapped(*args):
            found = real(*args)
            copied[what] += found is not None
            return found

        return wrapped

    for mode in ("copy", "read"):
        with monkeypatch.context() as m:
            if mode == "read":
                _no_rows(m)
            else:
                m.setattr(megatron._Source, "ranges", counting("shards", megatron._Source.ranges))
                reader_cls = import_hf.__globals__["_HFReader"]
                m.setattr(reader_cls, "located", counting("hf", reader_cls.located))
            d = tmp_path / mode
            mega = export_megatron(src, d / "mega", tp=2, pp=2, progress=False)
            one = reshard_megatron(mega, d / "mega1", tp=1, pp=1, progress=False)
            # tp 2 -> tp 2 on other stages: column blocks cut from column-split shards.
            two = reshard_megatron(mega, d / "mega2", tp=2, pp=1, progress=False)
            back = import_megatron(one, d / "back", progress=False)
            hf_dir = export_hf(src, d / "hf", progress=False)
            from_hf = import_hf(hf_dir, d / "from_hf", progress=False)
            runs[mode] = (mega, one, two, back, from_hf)
    assert copied["shards"] > 0 and copied["hf"] > 0, copied
    for a, b in zip(runs["copy"][:3], runs["read"][:3], strict=True):
        _equal_trees(_load_all(a), _load_all(b))
    for a, b in zip(runs["copy"][3:], runs["read"][3:], strict=True):
        pa, pb = latest_checkpoint(a), latest_checkpoint(b)
        for name, p in model.named_parameters():
            key = manifest.model_key(name)
            assert torch.equal(dcp_direct.read_tensor(pa, key), p.detach()), name
            assert torch.equal(storage.read_tensor(pb, key), p.detach()), name
    # The copy path copied: every tensor of the tp files (row and column blocks) is located.
    reader = megatron.MegatronReader(runs["copy"][0], progress=False)
    assert all(reader.located(name) is not None for name, _ in reader.params)
    reader.close()
