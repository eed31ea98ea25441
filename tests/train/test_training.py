"""Single-process training end to end on a small real corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_overrides
from yuanlfa.checkpoint import CheckpointError, latest_checkpoint
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.data import DataError, IndexedDatasetBuilder
from yuanlfa.train import train
from yuanlfa.train.trainer import NonFiniteGradients

ROOT = Path(__file__).resolve().parents[2]


def _run(corpus: str, **extra: object):
    return train(config_from_dict(tiny_overrides(corpus, **extra)), progress=False)


@pytest.mark.slow
def test_loss_falls_and_log_has_every_step(small_corpus: str, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    result = _run(small_corpus, train__steps=40, logging__jsonl=str(log))
    losses = [r["loss"] for r in result.records]
    assert len(losses) == 40
    # Uniform guessing over 384 ids costs ln(384) = 5.95 nats; real text must go well below.
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
    assert records[-1]["loss"] == losses[-1]
    assert "eval_loss" in records[-1] and math.isfinite(records[-1]["eval_loss"])


def test_accumulation_matches_one_big_microbatch(small_corpus: str) -> None:
    """The gradient is the global-batch mean however the batch is cut into microbatches."""
    a = _run(small_corpus, train__steps=3, train__micro_batch_size=1)
    b = _run(small_corpus, train__steps=3, train__micro_batch_size=8)
    for ra, rb in zip(a.records, b.records):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_resume_is_exact(small_corpus: str, tmp_path: Path) -> None:
    full = _run(small_corpus, train__steps=8)
    ckpt = str(tmp_path / "ckpt")
    first = _run(small_corpus, train__steps=8, train__exit_interval=4, checkpoint__dir=ckpt)
    assert len(first.records) == 4
    assert latest_checkpoint(ckpt).name == "step_0000004"
    second = _run(small_corpus, train__steps=8, checkpoint__dir=ckpt, checkpoint__resume=True)
    assert [r["step"] for r in second.records] == [5, 6, 7, 8]
    resumed = [r["loss"] for r in first.records + second.records]
    assert resumed == [r["loss"] for r in full.records]  # bit for bit


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a checkpoint directory by relative path: its exact contents."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_existing_checkpoints_are_not_overwritten(small_corpus: str, tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    _run(small_corpus, train__steps=2, checkpoint__dir=ckpt)
    before = _files(Path(ckpt) / "step_0000002")
    assert any(name.endswith(".distcp") for name in before) and "meta.json" in before
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        _run(small_corpus, train__steps=2, checkpoint__dir=ckpt)
    assert _files(Path(ckpt) / "step_0000002") == before


def test_crash_during_save_keeps_last_good_checkpoint(
    small_corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    _run(small_corpus, train__steps=4, train__exit_interval=2, checkpoint__dir=str(ckpt))
    good = _files(ckpt / "step_0000002")
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        # The tensors are written by then: the save fails near its end.
        if "rng" in str(f):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    # The failed write stops the run with one message naming the directory and the cause.
    with pytest.raises(CheckpointError, match=r"checkpoint save into .*disk full \(simulated\)"):
        _run(small_corpus, train__steps=4, checkpoint__dir=str(ckpt), checkpoint__resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(ckpt).name == "step_0000002"
    assert _files(ckpt / "step_0000002") == good
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]
    again = _run(small_corpus, train__steps=4, checkpoint__dir=str(ckpt), checkpoint__resume=True)
    assert [r["step"] for r in again.records] == [3, 4]


def test_nonfinite_gradients_skip_or_stop(small_corpus: str) -> None:
    # A huge learning rate blows the weights up after the first update; later gradients are NaN.
    skipped = _run(small_corpus, train__steps=4, optim__lr=1e30, optim__min_lr=0.0)
    assert any(r.get("skipped") for r in skipped.records)
    with pytest.raises(NonFiniteGradients, match=r"step \d+"):
        _run(
            small_corpus,
            train__steps=4,
            optim__lr=1e30,
            optim__min_lr=0.0,
            train__stop_on_nan=True,
        )


def test_data_tokens_outside_vocab_are_refused(tmp_path: Path) -> None:
    prefix = str(tmp_path / "bad")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document(list(range(200)) + [1000] + list(range(200)))
        builder.finalize()
    with pytest.raises(DataError, match="1000"):
        _run(prefix, train__steps=1)


def test_cli_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1.0\n")
    out = subprocess.run(
        [sys.executable, "-m", "yuanlfa.cli.train", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "optim.lr" in out.stderr


def test_tensorboard_scalars_written(small_corpus: str, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    _run(small_corpus, train__steps=2, logging__tensorboard_dir=str(tb))
    events = list(tb.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_refuses_changed_run_settings(small_corpus: str, tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    _run(small_corpus, train__steps=4, train__exit_interval=2, checkpoint__dir=ckpt)
    with pytest.raises(CheckpointError, match="train.steps 4 -> 6"):
        _run(small_corpus, train__steps=6, checkpoint__dir=ckpt, checkpoint__resume=True)


def test_missing_latest_pointer_falls_back_and_log_is_not_duplicated(
    small_corpus: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "log.jsonl"
    full = _run(small_corpus, train__steps=4)
    _run(
        small_corpus, train__steps=4, train__exit_interval=2, checkpoint__dir=str(ckpt),
        logging__jsonl=str(log),
    )  # fmt: skip
    (ckpt / "latest").unlink()  # as after a crash between the rename and the pointer write
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(small_corpus, train__steps=4, checkpoint__dir=str(ckpt))
    # Pretend step 3 was logged before a crash: the resumed run must replace, not repeat, it.
    with log.open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    again = _run(
        small_corpus, train__steps=4, checkpoint__dir=str(ckpt), checkpoint__resume=True,
        logging__jsonl=str(log),
    )  # fmt: skip
    assert [r["step"] for r in again.records] == [3, 4]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in full.records]


def test_record_of_a_saved_step_survives_a_kill_before_it_was_logged(
    small_corpus: str, tmp_path: Path
) -> None:
    """A process killed after its save was published but before the step's record reached the
    log (the window that made the elastic-restart test flaky) gets the record back from the
    checkpoint on resume: the log still has every step once."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    full = _run(small_corpus, train__steps=4)
    _run(
        small_corpus, train__steps=4, train__exit_interval=2, checkpoint__dir=str(ckpt),
        logging__jsonl=str(log),
    )  # fmt: skip
    lines = log.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    log.write_text(lines[0] + "\n")  # step 2's record never made it
    again = _run(
        small_corpus, train__steps=4, checkpoint__dir=str(ckpt), checkpoint__resume=True,
        logging__jsonl=str(log),
    )  # fmt: skip
    assert [r["step"] for r in again.records] == [3, 4]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in full.records]
    # The restored record is the step's own, less the save timings measured after it was taken.
    original = json.loads(lines[1])
    assert "save_blocking_s" in original
    assert records[1] == {k: v for k, v in original.items() if not k.startswith("save_")}
    assert not (tmp_path / "log.jsonl.tmp").exists()


def test_bf16_autocast_tracks_fp32(small_corpus: str) -> None:
    # The GPU default (bf16 autocast) exercised on the CPU: LFA, RoPE and the block-wise loss
    # must keep forward and backward consistent, so the curve stays close to fp32's.
    fp32 = _run(small_corpus, train__steps=6)
    bf16 = _run(small_corpus, train__steps=6, train__precision="bf16")
    for a, b in zip(fp32.records, bf16.records):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-1)


def test_recompute_modes_give_identical_training(small_corpus: str) -> None:
    runs = {
        mode: [r["loss"] for r in _run(small_corpus, train__steps=3, train__recompute=mode).records]
        for mode in ("none", "selective", "full")
    }
    assert runs["selective"] == runs["none"]
    assert runs["full"] == runs["none"]


def test_recompute_drops_saved_activations() -> None:
    from yuanlfa.model import create_model
    from yuanlfa.parallel.recompute import apply_recompute

    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    ).model
    ids = torch.randint(0, 128, (2, 32))

    def saved_numel(mode: str) -> int:
        model = apply_recompute(create_model(cfg, 1), mode)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return total

    none, selective, full = (saved_numel(m) for m in ("none", "selective", "full"))
    assert full < selective < none


def test_resumed_log_takes_the_checkpoints_record_only_for_its_own_step(tmp_path: Path) -> None:
    """An island healed from a live one starts at the live island's step, not at its own
    checkpoint's: that checkpoint's record must not be appended out of order."""
    from yuanlfa.config import LoggingConfig
    from yuanlfa.train.metrics import MetricsLogger

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    cfg = LoggingConfig(jsonl=str(log))
    MetricsLogger(cfg, 10, start_step=5, start_record={"step": 2, "loss": 9.0}).close()
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    MetricsLogger(cfg, 10, start_step=4, start_record={"step": 4, "loss": 9.0}).close()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 9.0)]
