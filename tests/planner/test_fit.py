"""The fit check: each pipeline rank's predicted peak against the device's memory.

The three presets fit an H100 80 GB (their train.device_memory_gb) by the planner's numbers; the
102B preset without recompute does not, and the verdict says by how much and names settings
that the planner then confirms fit; yuanlfa-train stops with the verdict before building
anything."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from yuanlfa.cli.info import main as info_main
from yuanlfa.cli.info import summarize
from yuanlfa.config import ConfigError, config_from_dict, load_config, resolve
from yuanlfa.planner.fit import GIB, fit_report, rank_peaks, require_fit

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["yuan2-2b", "yuan2-51b", "yuan2-102b"]


def _world(cfg) -> int:
    p = cfg.parallel
    return p.tp * p.pp * (p.dp or 1)


def _resolved(preset: str, overrides: list[str] | None = None):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", overrides or [])
    return resolve(cfg, _world(cfg))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fit_an_h100_80gb(preset: str, capsys) -> None:
    cfg = _resolved(preset)
    assert cfg.train.device_memory_gb == 80
    report = fit_report(cfg, 80)
    assert report.fits and report.margin_bytes > 0
    # The verdict is about the numbers yuanlfa-info prints per rank.
    info = summarize(cfg)
    assert report.peak_bytes == info["max_rank_bytes_with_activations"]
    assert info["fit"]["fits"] and info["fit"]["margin_bytes"] == 80 * GIB - report.peak_bytes
    assert info_main(["--config", str(ROOT / "configs" / f"{preset}.yaml")]) == 0
    assert "fit             fits: pipeline rank" in capsys.readouterr().out


def test_102b_without_recompute_gets_the_overflow_and_the_knob(capsys) -> None:
    cfg = _resolved("yuan2-102b", ["train.recompute=none"])
    report = fit_report(cfg, 80)
    assert not report.fits
    over = report.peak_bytes - 80 * GIB
    assert over > 0 and report.peak_bytes == max(rank_peaks(cfg))
    verdict = report.verdict()
    assert f"{over / GIB:.1f} GiB over" in verdict
    assert any("train.recompute=full" in k.setting for k in report.knobs), verdict
    # Every suggested setting really fits when applied to the preset.
    for knob in report.knobs:
        fixed = _resolved_with(["train.recompute=none", *knob_overrides(knob.setting)])
        assert fit_report(fixed, 80).fits, knob.setting
    preset = str(ROOT / "configs" / "yuan2-102b.yaml")
    assert info_main(["--config", preset, "--set", "train.recompute=none"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "train.recompute=full" in out
    with pytest.raises(ConfigError, match="does not fit.*it fits with"):
        require_fit(cfg, 80)


def knob_overrides(setting: str) -> list[str]:
    """A knob's ``key=value`` settings (the pp knob's note in parentheses dropped)."""
    return [w for w in shlex.split(setting.split(" (")[0]) if "=" in w]


def _resolved_with(overrides: list[str]):
    cfg = load_config(ROOT / "configs" / "yuan2-102b.yaml", overrides)
    if any(o.startswith("parallel.pp=") for o in overrides):
        # More stages: the preset's 32-stage block list no longer applies.
        cfg = load_config(
            ROOT / "configs" / "yuan2-102b.yaml", [*overrides, "parallel.pipeline_blocks=null"]
        )
    return resolve(cfg, _world(cfg))


def test_train_stops_before_allocating(tmp_path) -> None:
    from yuanlfa.train import train

    # Files that exist (the preflight checks that) but are empty: reading them would fail with
    # another error, so the fit verdict comes before any data is read.
    for suffix in (".bin", ".idx"):
        (tmp_path / f"never-read{suffix}").write_bytes(b"")
    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 384},
            "train": {"device": "cpu", "steps": 1, "device_memory_gb": 1e-4},
            "data": {"path": str(tmp_path / "never-read")},
        }
    )
    with pytest.raises(ConfigError, match="does not fit: pipeline rank 0 needs"):
        train(cfg, progress=False)
