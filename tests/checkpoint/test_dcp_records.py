"""DCP's ``.metadata`` read as plain records (no torch.distributed.checkpoint import) holds what
DCP's own classes hold, and a conversion out of our format never imports DCP."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import MetadataIndex as DcpIndex

from tests.checkpoint.test_dcp_direct import TENSORS, _save
from yuanlfa.checkpoint import CheckpointError, TrainingState, dcp_records, save_checkpoint, storage
from yuanlfa.config import config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train.optimizer import build_optimizer

ROOT = Path(__file__).resolve().parents[2]


def test_records_hold_what_dcp_classes_hold(tmp_path: Path) -> None:
    _save(tmp_path, TENSORS)  # rows, column blocks, flat dp ranges, a 0-d tensor
    storage.forget_metadata()
    theirs = storage.storage_reader(tmp_path).read_metadata()  # DCP's classes
    ours = dcp_records.read_metadata(tmp_path)
    assert type(theirs).__module__ == "torch.distributed.checkpoint.metadata"
    assert isinstance(ours, dcp_records.Metadata)
    assert set(ours.state_dict_metadata) == set(theirs.state_dict_metadata) == set(TENSORS)
    for key, md in theirs.state_dict_metadata.items():
        rec = ours.state_dict_metadata[key]
        assert tuple(rec.size) == tuple(md.size) == tuple(TENSORS[key].shape)
        assert rec.properties.dtype == md.properties.dtype == TENSORS[key].dtype
        assert [(tuple(c.offsets), tuple(c.sizes)) for c in rec.chunks] == [
            (tuple(c.offsets), tuple(c.sizes)) for c in md.chunks
        ]
        for chunk in md.chunks:
            # Looked up with a plain tuple, as the direct readers do.
            got = ours.storage_data[dcp_records.MetadataIndex(key, tuple(chunk.offsets))]
            want = theirs.storage_data[DcpIndex(key, chunk.offsets)]
            assert (got.relative_path, got.offset, got.length) == (
                want.relative_path,
                want.offset,
                want.length,
            )
    assert len(ours.storage_data) == len(theirs.storage_data)


def test_records_refuse_what_the_allow_list_refuses(tmp_path: Path) -> None:
    _save(tmp_path, TENSORS)
    metadata = pickle.loads((tmp_path / ".metadata").read_bytes())  # our own, trusted here
    metadata.planner_data = print  # a global outside the allow-list
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    storage.forget_metadata()
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        dcp_records.read_metadata(tmp_path)


def test_a_truncated_data_file_is_named(tmp_path: Path) -> None:
    _save(tmp_path, TENSORS)
    data = max(tmp_path.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    storage.forget_metadata()
    with pytest.raises(CheckpointError, match=rf"{data.name}: 100 bytes.*truncated"):
        dcp_records.read_metadata(tmp_path)


def test_exports_do_not_import_dcp(tmp_path: Path) -> None:
    """ours -> HF and ours -> Megatron in a fresh process: the outputs are written and
    torch.distributed.checkpoint (0.7 s of import) is never loaded."""
    model_cfg = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 64}
    cfg = config_from_dict({"model": model_cfg})
    model = create_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.optim)
    state = TrainingState(1, 0, config_to_dict(cfg.model), {})
    mesh = build_mesh(cfg.parallel, 1, 0)
    src = save_checkpoint(tmp_path / "ours", model, opt, state, mesh, cfg.model, {"tp": 1})
    code = (
        "import sys\n"
        "from yuanlfa.cli.reshard import main\n"
        f"src, out = {str(src)!r}, {str(tmp_path)!r}\n"
        "assert main(['--input', src, '--output', out + '/hf', '--to', 'hf', '--quiet']) == 0\n"
        "assert main(['--input', src, '--output', out + '/meg', '--to', 'megatron',\n"
        "             '--target-tp', '2', '--target-pp', '2', '--quiet']) == 0\n"
        "print('torch.distributed.checkpoint' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "False", done.stdout
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").is_file()
    # What was written is what DCP's own reader reads from the source.
    hf = {}
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        hf.update(load_file(shard))
    storage.forget_metadata()
    embed = storage.read_tensor(src, "model.embed.weight")
    assert torch.equal(hf["model.embed_tokens.weight"], embed)
