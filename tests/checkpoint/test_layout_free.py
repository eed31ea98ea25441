"""Layout-free checkpoints: saved under one tp x pp x dp layout (and optimizer mode), resumed
under another, training continues with the losses of an uninterrupted single-process run; bad
checkpoints are refused naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.checkpoint import CheckpointError, TrainingState, load_checkpoint, save_checkpoint
from yuanlfa.config import config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train import train
from yuanlfa.train.optimizer import build_optimizer

STEPS, SAVE_AT = 10, 5


def _run(corpus: str, ckpt: str | None, resume: bool = False, **extra: object):
    cfg = tiny_overrides(
        corpus,
        model__num_layers=4,
        train__steps=STEPS,
        train__micro_batch_size=1,
        train__exit_interval=SAVE_AT if ckpt and not resume else 0,
        optim__clip_grad=0.5,
        **extra,
    )
    if ckpt:
        cfg["checkpoint"] = {"dir": ckpt, "resume": resume, "save_at_end": False}
    return [(r["step"], r["loss"], r["grad_norm"]) for r in train(config_from_dict(cfg)).records]


# Each entry: the layout that saves, then the layout that resumes (4 processes each).
SWITCHES = {
    "tp2 x pp2 [1,3] + sp -> pp2 [3,1] x dp2 + zero1": (
        {"parallel__tp": 2, "parallel__pp": 2, "parallel__pipeline_blocks": [1, 3],
         "parallel__sequence_parallel": True},
        {"parallel__pp": 2, "parallel__pipeline_blocks": [3, 1], "optim__distributed": True},
    ),
    "dp4 + zero1 -> tp2 x dp2 + sp": (
        {"optim__distributed": True},
        {"parallel__tp": 2, "parallel__sequence_parallel": True},
    ),
}  # fmt: skip


def _switch(rank: int, world: int, corpus: str, root: str) -> dict[str, list]:
    out = {}
    for i, (name, (first, second)) in enumerate(SWITCHES.items()):
        ckpt = f"{root}/switch{i}"
        head = _run(corpus, ckpt, **first)
        tail = _run(corpus, ckpt, resume=True, **second)
        out[name] = head + tail
    return out


@pytest.mark.slow
def test_resume_under_another_layout_continues_the_same_run(small_corpus, tmp_path) -> None:
    single = _run(small_corpus, None)
    results = run_distributed(_switch, 4, small_corpus, str(tmp_path), timeout=900)
    for name, run in results[0].items():
        assert [s for s, _, _ in run] == list(range(1, STEPS + 1)), name
        for (step, loss, norm), (_, ref_loss, ref_norm) in zip(run, single, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (name, step)
            assert norm == pytest.approx(ref_norm, rel=1e-4), (name, step)
    # A checkpoint written by 4 processes under tp x pp resumes in one process too.
    meta = json.loads((tmp_path / "switch0" / "step_0000005" / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    tail = _run(small_corpus, str(tmp_path / "switch0"), resume=True)
    assert [s for s, _, _ in tail] == list(range(SAVE_AT + 1, STEPS + 1))
    for (_, loss, _), (_, ref, _) in zip(tail, single[SAVE_AT:], strict=True):
        assert loss == pytest.approx(ref, rel=1e-5)


def _model_and_optimizer(hidden: int):
    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": hidden, "num_heads": 4, "vocab_size": 128}}
    )
    model = create_model(cfg.model, seed=3)
    return cfg, model, build_optimizer(model, cfg.optim)


def test_round_trip_restores_parameters_and_adam_state(tmp_path: Path) -> None:
    cfg, model, opt = _model_and_optimizer(64)
    mesh = build_mesh(cfg.parallel, 1, 0)
    model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).sum().backward()
    opt.step()
    state = TrainingState(1, 8, config_to_dict(cfg.model), {})
    path = save_checkpoint(tmp_path, model, opt, state, mesh, cfg.model, {"tp": 1})
    _, fresh, fresh_opt = _model_and_optimizer(64)
    loaded = load_checkpoint(path, fresh, fresh_opt, config_to_dict(cfg.model), mesh, cfg.model)
    assert (loaded.step, loaded.consumed_samples) == (1, 8)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], fresh_opt.state[q][key], rtol=0, atol=0)


def test_mismatched_checkpoints_are_refused_naming_the_tensors(tmp_path: Path) -> None:
    cfg, model, opt = _model_and_optimizer(64)
    mesh = build_mesh(cfg.parallel, 1, 0)
    saved_config = config_to_dict(cfg.model)
    path = save_checkpoint(
        tmp_path, model, opt, TrainingState(1, 0, saved_config, {}), mesh, cfg.model, {}
    )
    other_cfg, other, other_opt = _model_and_optimizer(32)
    with pytest.raises(CheckpointError, match="saved for another model .*hidden_size"):
        load_checkpoint(
            path, other, other_opt, config_to_dict(other_cfg.model), mesh, other_cfg.model
        )
    # Same config text, other shapes (e.g. a hand-edited manifest): the shapes are checked.
    with pytest.raises(CheckpointError, match=r"shape checkpoint vs model: \['model\.embed"):
        load_checkpoint(path, other, other_opt, saved_config, mesh, other_cfg.model)
    (path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        load_checkpoint(path, model, opt, saved_config, mesh, cfg.model)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not a readable JSON manifest"),
        ("[1, 2]", "holds a JSON list"),
        (json.dumps({"format": "yuanlfa-dcp-v1", "step": 1}), "no 'consumed_samples'"),
    ],
)
def test_a_corrupt_manifest_is_refused_naming_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    cfg, model, opt = _model_and_optimizer(64)
    mesh = build_mesh(cfg.parallel, 1, 0)
    saved_config = config_to_dict(cfg.model)
    path = save_checkpoint(
        tmp_path, model, opt, TrainingState(1, 0, saved_config, {}), mesh, cfg.model, {}
    )
    (path / "meta.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"meta.json: {problem}"):
        load_checkpoint(path, model, opt, saved_config, mesh, cfg.model)
