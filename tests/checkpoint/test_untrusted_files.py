"""A checkpoint is something users download and share: no file in our own format runs pickled
code when it is resumed from, imported or converted. A crafted ``.metadata`` and a crafted RNG
file are refused, the message names the global found, and the payload never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from yuanlfa.checkpoint import CheckpointError, TrainingState, load_checkpoint, save_checkpoint
from yuanlfa.checkpoint.dcp_records import stored_tensors
from yuanlfa.checkpoint.storage import forget_metadata
from yuanlfa.cli.reshard import main as reshard
from yuanlfa.config import config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train.optimizer import build_optimizer


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _saved(tmp_path: Path):
    cfg = config_from_dict(
        {"model": {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "vocab_size": 64}}
    )
    model = create_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.optim)
    mesh = build_mesh(cfg.parallel, 1, 0)
    state = TrainingState(1, 0, config_to_dict(cfg.model), {})
    path = save_checkpoint(tmp_path / "ckpt", model, opt, state, mesh, cfg.model, {"tp": 1})
    return cfg, model, opt, mesh, path


def test_the_metadata_of_a_good_checkpoint_reads_through_the_allow_list(tmp_path: Path) -> None:
    _, model, _, _, path = _saved(tmp_path)
    stored = stored_tensors(path)
    names = {f"model.{n}" for n, _ in model.named_parameters()}
    assert names <= set(stored)


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    cfg, model, opt, mesh, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own, trusted here
    metadata.planner_data = _Evil(marker)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    forget_metadata()

    with pytest.raises(CheckpointError, match=r"refused to unpickle.*posix\.system|os\.system"):
        load_checkpoint(path, model, opt, config_to_dict(cfg.model), mesh, cfg.model)
    assert not marker.exists()

    out = tmp_path / "hf"
    assert reshard(["--input", str(path), "--output", str(out), "--to", "hf", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "system" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_a_crafted_rng_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    cfg, model, opt, mesh, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (rng_file,) = (path / "rng").iterdir()
    torch.save({"torch_cpu": torch.get_rng_state(), "x": _Evil(marker)}, rng_file)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(path, model, opt, config_to_dict(cfg.model), mesh, cfg.model)
    assert not marker.exists()


def test_a_truncated_metadata_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg, model, opt, mesh, path = _saved(tmp_path)
    data = (path / ".metadata").read_bytes()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        (path / ".metadata").write_bytes(data[:cut])
        forget_metadata()
        with pytest.raises(CheckpointError, match=r"\.metadata"):
            load_checkpoint(path, model, opt, config_to_dict(cfg.model), mesh, cfg.model)
