"""The config, the layout vocabulary and yuanlfa-plan run with torch absent: each check runs in
a fresh interpreter whose import system refuses torch, triton and sentencepiece."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("torch", "triton", "sentencepiece")

# Installed first in the child: any import of a hidden package (or of a module under it) fails as
# it would where the package is not installed.
HIDE = f"""
import sys

class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ImportError(f"{{name}} is hidden by the test")
        return None

sys.meta_path.insert(0, _Hidden())
"""


def run_without_torch(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", HIDE + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def plan(*args: str) -> subprocess.CompletedProcess:
    code = f"""
import runpy
sys.argv = ["yuanlfa-plan", *{list(args)!r}]
try:
    runpy.run_module("yuanlfa.cli.plan", run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HIDDEN!r})
    print("LOADED", loaded, file=sys.stderr)
"""
    return run_without_torch(code)


def test_the_hiding_works() -> None:
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "hidden by the test" in result.stderr


def test_config_and_layout_import_without_torch() -> None:
    code = """
from yuanlfa.config import load_config, resolve
from yuanlfa.layout import build_layout, group_ranks, rank_coords, rank_order, dim_sizes

cfg = load_config("configs/yuan2-102b.yaml")
layout = build_layout(cfg.parallel, cfg.model)
assert layout.num_stages == 32 and layout.num_layers == 84
sizes = dim_sizes(cfg.parallel, 96)
assert len(group_ranks(rank_order(cfg.parallel), sizes, "pp")) == 3
assert rank_coords(rank_order(cfg.parallel), sizes, 95) == {"tp": 0, "dp": 2, "pp": 31}
resolve(load_config("configs/tiny.yaml"), 1, 262)
print("ok", sorted(m for m in sys.modules if m.startswith("yuanlfa.")))
"""
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout
    assert loaded.startswith("ok")
    # Nothing of the library beyond config and layout came along.
    for part in ("model", "parallel", "planner", "data", "ops", "train", "checkpoint"):
        assert f"'yuanlfa.{part}" not in loaded, loaded


@pytest.mark.parametrize("config", ["tiny.yaml", "yuan2-102b.yaml"])
@pytest.mark.parametrize("mode", ["text", "json"])
def test_plan_without_torch(config: str, mode: str) -> None:
    args = ["--config", f"configs/{config}"] + (["--json"] if mode == "json" else [])
    result = plan(*args)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stderr
    assert ('"blocks"' if mode == "json" else "balanced blocks") in result.stdout


@pytest.mark.parametrize(
    ("config", "cluster"),
    [
        ("tiny.yaml", ["--nodes", "1", "--gpus-per-node", "2", "--intra-bw", "100"]),
        (
            "yuan2-102b.yaml",
            ["--nodes", "2", "--gpus-per-node", "8", "--intra-bw", "400", "--inter-bw", "50"]
            + ["--device", "H200", "--top", "1"],
        ),
    ],
)
def test_plan_advise_without_torch(config: str, cluster: list[str]) -> None:
    result = plan("--config", f"configs/{config}", "--advise", *cluster)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stderr
    assert "parallel:" in result.stdout


def test_plan_paper_comparison_without_torch() -> None:
    result = plan("--config", "configs/yuan2-102b.yaml", "--paper-comparison")
    assert result.returncode == 0, result.stderr
    assert "the paper" in result.stdout


def test_plan_refuses_plugins_without_torch(tmp_path: Path) -> None:
    """Plug-ins are torch modules: without torch a config naming one gets a clear error."""
    plugin = tmp_path / "filter.py"
    plugin.write_text("import torch\n")
    result = plan("--config", "configs/tiny.yaml", "--set", f"model.plugins=[{plugin}]")
    assert result.returncode == 2, result.stderr
    assert "model.plugins" in result.stderr and "torch" in result.stderr
