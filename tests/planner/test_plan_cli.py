"""yuanlfa-plan run in-process: the acceptance properties on the 102B and paper configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yuanlfa.cli.plan import main
from yuanlfa.config import load_config

ROOT = Path(__file__).resolve().parents[2]
B102 = str(ROOT / "configs/yuan2-102b.yaml")
PAPER = str(ROOT / "configs/paper-24l-pp8.yaml")
SPLITS = ("released", "uniform", "balanced")


def run_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_102b_json(capsys) -> None:
    out = run_json(capsys, "--config", B102)
    assert out["pp"] == 32 and out["objective"] == "memory"
    assert out["device"]["name"] == "H100-SXM"
    released = list(load_config(B102).parallel.pipeline_blocks)
    assert out["released"]["blocks"] == released and out["released_source"] == "config"
    for name in SPLITS:
        plan = out[name]
        assert len(plan["stages"]) == 32 and sum(plan["blocks"]) == 84
        memories = [s["memory_bytes"] for s in plan["stages"]]
        assert plan["memory_max_bytes"] == max(memories)
        assert plan["memory_max_min_ratio"] == pytest.approx(max(memories) / min(memories))
        assert plan["time_max_s"] == pytest.approx(max(s["time_s"] for s in plan["stages"]))
        assert all(s["layers"] >= 0 for s in plan["stages"])
        assert 0 <= plan["bubble_fraction"] < 1
    balanced = out["balanced"]["memory_max_bytes"]
    assert balanced <= out["uniform"]["memory_max_bytes"]
    assert balanced <= out["released"]["memory_max_bytes"]
    assert out["balanced"]["memory_max_min_ratio"] < out["released"]["memory_max_min_ratio"]


def test_paper_example(capsys, tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    out = run_json(capsys, "--config", PAPER, "--plot", str(png))
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    uniform = [s["memory_bytes"] for s in out["uniform"]["stages"]]
    paper = [s["memory_bytes"] for s in out["released"]["stages"]]
    assert out["released"]["blocks"] == [2, 2, 3, 3, 4, 4, 4, 2]
    assert uniform.index(max(uniform)) == 0  # stage 1 is the heaviest
    assert max(paper) < max(uniform)
    assert 0.22 < 1 - paper[0] / uniform[0] < 0.34  # paper: 78 GB -> 56 GB, about 28% saved
    assert out["balanced"]["memory_max_bytes"] <= max(paper)


def test_text_output_and_overrides(capsys) -> None:
    assert main(["--config", B102, "--pp", "16", "--set", "train.recompute=full"]) == 0
    text = capsys.readouterr().out
    assert "released = uniform split" in text  # the config's split is for pp 32
    assert "balanced blocks:" in text and "bubble fraction" in text
    # Full recompute of every layer (the preset's own is block recompute of 2 per stage).
    out = run_json(capsys, "--config", B102, "--pp", "8", "--virtual-stages", "2", "--objective",
                   "time", "--set", "train.recompute=full", "train.recompute_method=uniform",
                   "train.recompute_num_layers=1", "--device", "h200")  # fmt: skip
    assert out["virtual_stages"] == 2 and out["schedule"] == "interleaved_1f1b"
    assert len(out["balanced"]["blocks"]) == 16 and len(out["balanced"]["stages"]) == 8
    assert out["balanced"]["time_max_s"] <= out["uniform"]["time_max_s"]
    assert out["balanced"]["fits"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config", B102, "--device", "tpu"], "H100-SXM"),
        (["--config", B102, "--pp", "0"], "--pp"),
        (["--config", B102, "--pp", "100"], "stages"),
        (["--config", B102, "--objective", "time", "--set", "train.recompute=none"], "recompute"),
        (["--config", "missing.yaml"], "not found"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, args: list[str], needle: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
