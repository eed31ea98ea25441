"""Run every ```bash block of README.md and docs/*.md, so a renamed flag breaks CI, not a user.

Blocks run in order, one guide per test, with bash in a scratch directory that links the
repository's files (configs/, examples/, ...), so what a block writes under runs/ is seen by the
next block of the same guide. A block preceded by ``<!-- docs-test: skip: REASON -->`` is not
run; the reason is required. Each ``yuanlfa-*`` console script (read from setup.py, so the entry
points are checked too) and ``torchrun`` are wrappers on PATH; with ``YUANLFA_DOCS_SMALL=1``
(set here) a training command that sets no ``train.steps`` itself gets ``--set train.steps=N``
appended (N from ``YUANLFA_DOCS_STEPS``, default 3), so runs of scripts with long defaults stay
short; the guides' own commands set small step counts and run exactly as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 600
# Reference pages, not tasks: they need no command of their own.
REFERENCE_PAGES = ("config.md", "architecture.md", "features.md", "errors.md", "yuan2_facts.md")


def blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) for each ```bash / ```sh block of a markdown file."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh"):
            start = i
            code: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            prev = lines[start - 1] if start else ""
            marker = SKIP.match(prev.strip())
            if "docs-test" in prev and not marker:
                raise AssertionError(f"{path.name}:{start}: malformed docs-test marker {prev!r}")
            out.append((start + 1, "\n".join(code) + "\n", marker.group(1) if marker else None))
        i += 1
    return out


def console_scripts() -> dict[str, str]:
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"(yuanlfa-[a-z-]+)=([\w.]+):main"', text))


_TRAIN_WRAPPER = """#!/usr/bin/env bash
# docs test: a short run when YUANLFA_DOCS_SMALL=1 and the command sets no train.steps itself
if [ "${{YUANLFA_DOCS_SMALL:-0}}" = 1 ] && [[ " $* " != *"train.steps="* ]] &&
   [[ " $* " == *" {module} "* || {always} = 1 ]]; then
  exec {exe} "$@" --set train.steps="${{YUANLFA_DOCS_STEPS:-3}}"
fi
exec {exe} "$@"
"""


def make_bin(directory: Path) -> Path:
    directory.mkdir()
    for name, module in console_scripts().items():
        always = 1 if module == "yuanlfa.cli.train" else 0
        exe = f"{sys.executable} -m {module}"
        if always:
            text = _TRAIN_WRAPPER.format(module="-", always=1, exe=exe)
        else:
            text = f'#!/usr/bin/env bash\nexec {exe} "$@"\n'
        (directory / name).write_text(text)
    run = f"{sys.executable} -m torch.distributed.run"
    (directory / "torchrun").write_text(
        _TRAIN_WRAPPER.format(module="yuanlfa.cli.train", always=0, exe=run)
    )
    for script in directory.iterdir():
        script.chmod(0o755)
    return directory


def scratch(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "runs", "build"):
            (work / entry.name).symlink_to(entry)
    return work


def test_every_skip_has_a_reason_and_guides_have_commands():
    for path in GUIDES:
        found = blocks(path)
        assert all(reason is None or reason.strip() for _, _, reason in found)
        if path.parent.name == "docs" and path.name not in REFERENCE_PAGES:
            assert any(reason is None for _, _, reason in found), f"{path.name}: nothing runs"


@pytest.mark.slow
@pytest.mark.parametrize("path", GUIDES, ids=[p.name for p in GUIDES])
def test_guide_commands_run(path, tmp_path):
    runnable = [(line, code) for line, code, reason in blocks(path) if reason is None]
    if not runnable:
        pytest.skip(f"{path.name} has no runnable block")
    work = scratch(tmp_path)
    bin_dir = make_bin(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "YUANLFA_DOCS_SMALL": "1",
        "MPLBACKEND": "Agg",
    }
    for line, code in runnable:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert proc.returncode == 0, (
            f"{path.name}:{line}: block failed (exit {proc.returncode})\n{code}\n"
            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
        )


def test_relative_links_point_at_files():
    """A renamed guide or example breaks here. docs/architecture.md is the lead's (issue 24)."""
    broken = []
    for path in GUIDES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if (
                not target.startswith(("http://", "https://"))
                and not (path.parent / target).exists()
            ):
                broken.append(f"{path.name} -> {target}")
    assert not broken, f"broken links: {broken}"
