"""The closed-form counts of the planner against the real model built on the meta device."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from yuanlfa.config import config_from_dict, load_config
from yuanlfa.model import build_model
from yuanlfa.planner import flops_per_token, param_counts, stage_memory

ROOT = Path(__file__).resolve().parents[2]


def _meta_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("lfa", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_param_counts_match_model(lfa: bool, tie: bool) -> None:
    cfg = config_from_dict(
        {"model": {"num_layers": 3, "hidden_size": 96, "num_heads": 4, "vocab_size": 256}}
    ).model
    cfg = dataclasses.replace(cfg, lfa=lfa, tie_embeddings=tie)
    counts = param_counts(cfg)
    model = build_model(cfg)
    assert counts.total == _meta_count(model)
    layer = model.layers["1"]
    assert counts.per_layer == _meta_count(layer)
    lfa_params = _meta_count(layer.attn.lf_gate) if lfa else 0
    assert counts.lfa_per_layer == lfa_params
    assert counts.per_layer_replicated == lfa_params + 2 * cfg.hidden_size


@pytest.mark.parametrize(
    "preset,paper", [("yuan2-2b", 2.09e9), ("yuan2-51b", 51.85e9), ("yuan2-102b", 102.58e9)]
)
def test_preset_counts_match_paper_and_model(preset: str, paper: float) -> None:
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    total = param_counts(cfg.model).total
    assert abs(total - paper) / paper < 0.005
    assert total == _meta_count(build_model(cfg.model))


def test_lfa_flops_are_about_4h2_per_token() -> None:
    cfg = config_from_dict(
        {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    ).model
    f = flops_per_token(cfg, seq_length=32)
    h = 64
    # Forward: two GEMMs, [h/2 x 2h] and [h x h], i.e. 2 * (h^2 + h^2) FLOPs per layer.
    assert f["lfa"] == 2 * 2 * 2 * h * h
    assert f["train"] == 3 * f["forward"]
    assert f["attention"] == 2 * 4 * 32 * h * 0.5


def test_stage_memory_follows_blocks_and_sharding() -> None:
    cfg = config_from_dict(
        {
            "model": {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "vocab_size": 128},
            "parallel": {"pp": 3, "pipeline_blocks": [1, 2, 3]},
            "optim": {"distributed": True},
        }
    )
    counts = param_counts(cfg.model)
    plain = stage_memory(cfg, dp=1)
    sharded = stage_memory(cfg, dp=4)
    assert [s.layers for s in plain] == [1, 2, 3]
    assert plain[0].params == counts.per_layer + counts.embedding
    assert plain[1].params == 2 * counts.per_layer
    assert plain[2].params == 3 * counts.per_layer + counts.final_norm + counts.embedding
    for a, b in zip(plain, sharded):
        assert b.optimizer_bytes == -(-a.optimizer_bytes // 4)
        assert b.weights_bytes == a.weights_bytes


def test_info_cli_102b_json_fast() -> None:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "yuanlfa.cli.info", "--config", "configs/yuan2-102b.yaml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    info = json.loads(out.stdout)
    assert abs(info["params_total"] - 102.58e9) / 102.58e9 < 0.005
    assert info["layout"]["pipeline_blocks"] == list(
        load_config(ROOT / "configs/yuan2-102b.yaml").parallel.pipeline_blocks
    )
    assert len(info["per_rank"]) == 32
    assert elapsed < 20


def test_info_cli_reports_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 100\n  num_heads: 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "yuanlfa.cli.info", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "model.hidden_size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
