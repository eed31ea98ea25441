"""A writer killed (SIGKILL) at any point of a save leaves a loadable checkpoint: the previous one
until the new one is complete, and the new one after; the next save of the same step succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yuanlfa.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from yuanlfa.config import config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train.optimizer import build_optimizer

ROOT = Path(__file__).resolve().parents[2]

# Where the writer dies, and which checkpoint must be the latest afterwards.
KILL_POINTS = {
    "while writing tensor data": 1,
    "before the RNG file": 1,
    "before renaming the finished directory": 1,
    # The renamed step_2 is complete, but `latest` still names step 1: that is what loads.
    "after the rename, before the latest pointer": 1,
    "while replacing the latest pointer": 1,
    "while pruning the old checkpoint": 2,
}


def _setup():
    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}}
    )
    model = create_model(cfg.model, seed=1)
    return cfg, model, build_optimizer(model, cfg.optim)


def _weights(step: int) -> list[torch.Tensor]:
    """The parameters the writer saves at ``step`` (step 2: step 1's plus 1)."""
    _, model, _ = _setup()
    return [p.detach() + (step - 1) for p in model.parameters()]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """Make this process kill itself at ``point`` of the next save."""
    import yuanlfa.checkpoint.files as files
    import yuanlfa.checkpoint.layout_free as lf
    from yuanlfa.checkpoint.planners import BlockSavePlanner

    if point == "while writing tensor data":
        resolve, calls = BlockSavePlanner.resolve_data, []

        def resolve_then_die(self, item):
            calls.append(item)
            if len(calls) == 3:  # some tensors are in the file, the rest never will be
                _die()
            return resolve(self, item)

        BlockSavePlanner.resolve_data = resolve_then_die
    elif point == "before the RNG file":
        lf.torch.save = lambda *a, **k: _die()
    elif point == "before renaming the finished directory":
        replace = os.replace
        lf.os.replace = lambda src, dst: (
            _die() if Path(dst).name.startswith("step_") else (replace(src, dst))
        )
    elif point == "after the rename, before the latest pointer":
        lf.write_text_atomic = lambda *a, **k: _die()
    elif point == "while replacing the latest pointer":
        replace = os.replace
        files.os.replace = lambda src, dst: (
            _die() if Path(dst).name == "latest" else (replace(src, dst))
        )
    elif point == "while pruning the old checkpoint":

        def prune_half_then_die(root: Path, keep_last: int, keep: str, **_: object) -> None:
            old = root / "step_0000001"
            for i, f in enumerate(sorted(old.rglob("*"))):
                if f.is_file() and i % 2 == 0:
                    f.unlink()
            _die()

        lf.prune = prune_half_then_die
    else:
        raise ValueError(point)


def _writer(root: str, point: str | None) -> None:
    """Save step 1, then step 2 (killed at ``point``; never returns when armed)."""
    cfg, model, opt = _setup()
    mesh = build_mesh(cfg.parallel, 1, 0)
    for step in (1, 2):
        if step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            if point is not None:
                _arm(point)
        if step == 1 and latest_checkpoint(root) is not None:
            continue  # a rerun after a crash: step 1 is on disk
        state = TrainingState(step, 8 * step, config_to_dict(cfg.model), {})
        save_checkpoint(root, model, opt, state, mesh, cfg.model, {}, keep_last=1)


def _spawn(root: Path, point: str | None) -> int:
    call = f"_writer({str(root)!r}, {point!r})"
    code = f"from tests.checkpoint.test_crash_during_save import _writer; {call}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=300).returncode


def _load_latest(root: Path) -> tuple[int, list[torch.Tensor]]:
    cfg, model, opt = _setup()
    path = latest_checkpoint(root)
    assert path is not None
    mesh = build_mesh(cfg.parallel, 1, 0)
    state = load_checkpoint(path, model, opt, config_to_dict(cfg.model), mesh, cfg.model)
    return state.step, [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_save_leaves_a_loadable_checkpoint(tmp_path: Path, point: str) -> None:
    assert _spawn(tmp_path, point) == -signal.SIGKILL
    step, weights = _load_latest(tmp_path)
    assert step == KILL_POINTS[point]
    for got, want in zip(weights, _weights(step), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The debris does not get in the way: saving again completes and becomes the latest.
    assert _spawn(tmp_path, None) == 0
    step, weights = _load_latest(tmp_path)
    assert step == 2
    for got, want in zip(weights, _weights(2), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _async_writer(root: str, point: str | None) -> None:
    """As ``_writer``, with background saves: step 2's writer thread is killed at ``point``
    while the training thread goes on updating the weights."""
    from yuanlfa.checkpoint.async_save import AsyncSaver

    cfg, model, opt = _setup()
    mesh = build_mesh(cfg.parallel, 1, 0)
    saver = AsyncSaver(root, keep_last=1)
    if latest_checkpoint(root) is not None:  # a rerun after a crash resumes from the latest
        state = load_checkpoint(
            latest_checkpoint(root), model, opt, config_to_dict(cfg.model), mesh, cfg.model
        )
        assert state.step == 1, state.step
    else:
        saver.save(model, opt, TrainingState(1, 8, config_to_dict(cfg.model), {}), mesh,
                   cfg.model, {})  # fmt: skip
        saver.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if point is not None:
        _arm(point)
    saver.save(model, opt, TrainingState(2, 16, config_to_dict(cfg.model), {}), mesh,
               cfg.model, {})  # fmt: skip
    with torch.no_grad():  # training goes on: none of this may reach the checkpoint
        for _ in range(1000):
            for p in model.parameters():
                p.add_(100.0)
            if saver.poll() is not None:
                break
    saver.wait()


ASYNC_KILL_POINTS = (
    "while writing tensor data",
    "before the RNG file",
    "after the rename, before the latest pointer",
)


@pytest.mark.slow
@pytest.mark.parametrize("point", ASYNC_KILL_POINTS)
def test_a_killed_background_save_leaves_a_loadable_checkpoint(tmp_path: Path, point: str) -> None:
    code = "from tests.checkpoint.test_crash_during_save import _async_writer; "
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def spawn(armed: str | None) -> int:
        call = f"_async_writer({str(tmp_path)!r}, {armed!r})"
        return subprocess.run(
            [sys.executable, "-c", code + call], cwd=ROOT, env=env, timeout=300
        ).returncode

    assert spawn(point) == -signal.SIGKILL
    step, weights = _load_latest(tmp_path)
    assert step == 1
    for got, want in zip(weights, _weights(1), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The next run resumes from it and its background save completes.
    assert spawn(None) == 0
    step, weights = _load_latest(tmp_path)
    assert step == 2
    for got, want in zip(weights, _weights(2), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
