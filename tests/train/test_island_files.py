"""Retention of the islands' checkpoint files (yuanlfa.train.islands): files of removed
checkpoints go, files of a background save still in flight stay."""

from __future__ import annotations

from pathlib import Path

from yuanlfa.checkpoint.files import step_name
from yuanlfa.train.islands import ISLANDS_DIR, _prune


def _published(root: Path, step: int) -> None:
    d = root / step_name(step)
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")


def test_prune_keeps_published_and_in_flight_steps(tmp_path: Path) -> None:
    for step in (5, 10):
        _published(tmp_path, step)
    for step in (3, 5, 10, 15):  # 3: retention removed it; 15: its save is still in flight
        (tmp_path / ISLANDS_DIR / step_name(step)).mkdir(parents=True)
    _prune(tmp_path)
    left = sorted(p.name for p in (tmp_path / ISLANDS_DIR).iterdir())
    assert left == [step_name(5), step_name(10), step_name(15)]
