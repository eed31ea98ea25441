"""Asynchronous saves: the checkpoint holds the state of the step that saved (not what training
did meanwhile), equals a synchronous save of it, is published only when every rank's write is
complete, and a failed background write stops the run at the next poll on every rank with the
previous checkpoint intact. Retention keeps the newest ``keep_last`` and every ``keep_every``-th."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import yuanlfa.checkpoint.layout_free as lf
from tests.distributed.launcher import run_distributed
from yuanlfa.checkpoint import (
    CheckpointError,
    TrainingState,
    async_save,
    latest_checkpoint,
    load_checkpoint,
    read_tensor,
    save_checkpoint,
    stored_tensors,
)
from yuanlfa.checkpoint.async_save import AsyncSaver, use_async
from yuanlfa.checkpoint.files import retained, step_dirs
from yuanlfa.config import config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train.optimizer import build_optimizer


def _setup(dp: int = 1, rank: int = 0):
    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": 64},
            "parallel": {"dp": dp},
        }
    )
    model = create_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.optim)
    return cfg, model, opt, build_mesh(cfg.parallel, dp, rank)


def _step(model, opt) -> None:
    """One real update (AdamW state changes too)."""
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    loss.backward()
    opt.step()
    opt.zero_grad()


def _state(cfg, step: int) -> TrainingState:
    return TrainingState(step, 8 * step, config_to_dict(cfg.model), {})


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: read_tensor(path, k) for k in sorted(stored_tensors(path))}


def test_auto_is_async_on_gpu_only() -> None:
    assert use_async(None, torch.device("cuda", 0))
    assert not use_async(None, torch.device("cpu"))
    assert use_async(True, torch.device("cpu"))


def test_async_checkpoint_is_the_state_of_the_saving_step(tmp_path: Path) -> None:
    cfg, model, opt, mesh = _setup()
    _step(model, opt)
    saver = AsyncSaver(tmp_path / "async", keep_last=3)
    started, previous = saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})
    assert previous is None and started.blocking_s >= 0
    # The reference, saved synchronously from the same state before training moves on.
    save_checkpoint(tmp_path / "sync", model, opt, _state(cfg, 1), mesh, cfg.model, {})
    for _ in range(3):  # training continues while the writer writes
        _step(model, opt)
    done = saver.wait()
    assert done is not None and done.path == tmp_path / "async" / "step_0000001"
    assert done.total_s >= started.blocking_s
    assert latest_checkpoint(tmp_path / "async") == done.path
    got, want = _tensors(done.path), _tensors(tmp_path / "sync" / "step_0000001")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # And it resumes: a fresh model loads the saved step's weights, not the trained-on ones.
    cfg2, model2, opt2, mesh2 = _setup()
    load_checkpoint(done.path, model2, opt2, config_to_dict(cfg.model), mesh2, cfg.model)
    for (n, p), k in zip(model2.named_parameters(), model2.state_dict(), strict=True):
        torch.testing.assert_close(p.detach(), want[f"model.{n}"], rtol=0, atol=0, msg=k)


def test_reserved_staging_buffers_are_the_ones_the_save_uses(tmp_path: Path) -> None:
    cfg, model, opt, mesh = _setup()
    _step(model, opt)
    saver = AsyncSaver(tmp_path / "async")
    saver.reserve(model, opt, mesh, cfg.model)  # allocated in the background
    _step(model, opt)  # training moves on meanwhile
    saver._stager._reserving.join()
    reserved = [b.data_ptr() for b in saver._stager.buffers]
    saver.save(model, opt, _state(cfg, 2), mesh, cfg.model, {})
    assert [b.data_ptr() for b in saver._stager.buffers] == reserved
    save_checkpoint(tmp_path / "sync", model, opt, _state(cfg, 2), mesh, cfg.model, {})
    _step(model, opt)
    done = saver.wait()
    got, want = _tensors(done.path), _tensors(tmp_path / "sync" / "step_0000002")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_next_save_publishes_the_one_in_flight_and_retention(tmp_path: Path) -> None:
    cfg, model, opt, mesh = _setup()
    saver = AsyncSaver(tmp_path, keep_last=2, keep_every=3)
    for step in range(1, 8):
        _step(model, opt)
        _, previous = saver.save(model, opt, _state(cfg, step), mesh, cfg.model, {})
        assert saver.in_flight
        if step > 1:  # at most one in flight: starting this one published the last one
            assert previous is not None and previous.path.name == f"step_{step - 1:07d}"
    saver.wait()
    assert not saver.in_flight
    assert [p.name for p in step_dirs(tmp_path)] == [
        "step_0000003",
        "step_0000006",
        "step_0000007",
    ]
    assert latest_checkpoint(tmp_path).name == "step_0000007"


def test_retention_policy() -> None:
    assert retained([1, 2, 3, 4, 5], 2, None) == {4, 5}
    assert retained([10, 20, 30, 40, 50], 1, 20) == {20, 40, 50}
    assert retained([], 2, 3) == set()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_every": 0}, "checkpoint.keep_every: must be >= 1"),
        ({"keep_last": 0}, "checkpoint.keep_last: must be >= 1"),
    ],
)
def test_bad_retention_is_refused(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        AsyncSaver(tmp_path, **kwargs)


class _UnwritableWriter(dcp.FileSystemWriter):
    """The checkpoint directory turned read-only under the writer (tests run as root, so a
    chmod would not stop them)."""

    def write_data(self, plan, planner):
        raise PermissionError(13, "Permission denied", str(self.fs.concat_path(self.path, "x")))


def test_failed_background_write_stops_at_next_poll_keeping_the_last(
    tmp_path: Path, monkeypatch
) -> None:
    cfg, model, opt, mesh = _setup()
    saver = AsyncSaver(tmp_path, keep_last=1)
    _step(model, opt)
    saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})
    saver.wait()
    good = _tensors(tmp_path / "step_0000001")
    monkeypatch.setattr(lf.dcp, "FileSystemWriter", _UnwritableWriter)
    _step(model, opt)
    saver.save(model, opt, _state(cfg, 2), mesh, cfg.model, {})  # returns: the write is behind
    with pytest.raises(CheckpointError, match=rf"save into {tmp_path} failed.*Permission denied"):
        while saver.poll() is None:
            _step(model, opt)
    assert not saver.in_flight
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert not (tmp_path / ".step_0000002.tmp").exists()  # the partial directory is gone
    for k, v in _tensors(tmp_path / "step_0000001").items():
        torch.testing.assert_close(v, good[k], rtol=0, atol=0)


def test_unwritable_directory_is_refused_before_staging(tmp_path: Path) -> None:
    cfg, model, opt, mesh = _setup()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    saver = AsyncSaver(blocker / "ckpt")
    with pytest.raises(CheckpointError, match=rf"cannot create {blocker}/ckpt/\.step_0000001"):
        saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})


def test_sync_mode_writes_inline(tmp_path: Path) -> None:
    cfg, model, opt, mesh = _setup()
    saver = AsyncSaver(tmp_path, enabled=False)
    started, _ = saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})
    assert not saver.in_flight and latest_checkpoint(tmp_path) == started.path


def _two_ranks(rank: int, world: int, root: str, fail_rank: int | None) -> dict:
    cfg, model, opt, mesh = _setup(dp=world, rank=rank)
    saver = AsyncSaver(root, keep_last=2)
    _step(model, opt)
    saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})
    polls = 0
    while saver.poll() is None:
        polls += 1
    if fail_rank == rank:
        # This rank's RNG file cannot be written: no rank may publish step 2.
        lf.torch.save = lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left"))
    _step(model, opt)
    saver.save(model, opt, _state(cfg, 2), mesh, cfg.model, {})
    error = None
    try:
        while saver.poll() is None:
            _step(model, opt)
    except CheckpointError as exc:
        error = str(exc)
    return {"error": error, "latest": latest_checkpoint(root).name}


@pytest.mark.parametrize("fail_rank", [None, 1, 0])
def test_two_ranks_publish_only_when_every_rank_wrote(tmp_path: Path, fail_rank) -> None:
    results = run_distributed(_two_ranks, 2, str(tmp_path), fail_rank, timeout=300)
    if fail_rank is None:
        assert [r["error"] for r in results] == [None, None]
        assert [r["latest"] for r in results] == ["step_0000002"] * 2
        assert sorted((tmp_path / "step_0000002" / "rng").iterdir())  # both ranks' RNG files
        assert len(list((tmp_path / "step_0000002" / "rng").iterdir())) == 2
    else:
        # Every rank stops at the same poll; step 1 stays the latest.
        assert all(r["error"] is not None for r in results), results
        assert "No space left" in results[fail_rank]["error"]
        assert [r["latest"] for r in results] == ["step_0000001"] * 2
        assert not (tmp_path / "step_0000002").exists()


def test_config_keys() -> None:
    from yuanlfa.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.keep_every: must be >= 1"):
        config_from_dict({"checkpoint": {"keep_every": 0}})
    c = config_from_dict({"checkpoint": {"keep_every": 5, "async_save": True}}).checkpoint
    assert (c.keep_every, c.async_save) == (5, True)
    assert config_from_dict({}).checkpoint.async_save is None  # auto: on GPU


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_background_writer_yields_the_cpu_to_training(tmp_path: Path, monkeypatch) -> None:
    """The writer thread runs at WRITER_NICE; the training thread's priority is untouched."""
    cfg, model, opt, mesh = _setup()
    seen = []
    write = lf.write_job

    def spy(job, group=None):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return write(job, group)

    monkeypatch.setattr(async_save, "write_job", spy)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    saver = AsyncSaver(tmp_path)
    _step(model, opt)
    saver.save(model, opt, _state(cfg, 1), mesh, cfg.model, {})
    saver.wait()
    assert seen == [max(async_save.WRITER_NICE, before)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert latest_checkpoint(tmp_path).name == "step_0000001"
