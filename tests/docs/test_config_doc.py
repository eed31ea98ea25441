"""docs/config.md is generated from the schema and must be up to date and complete."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from yuanlfa.cli.config_doc import PLAIN, render, rows
from yuanlfa.config import Config

ROOT = Path(__file__).resolve().parents[2]


def test_config_md_is_up_to_date():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == render(), (
        "docs/config.md is out of date: run python -m yuanlfa.cli.config_doc --output "
        "docs/config.md"
    )


def test_every_key_is_documented_with_a_meaning():
    keys = {
        f"{section}.{f.name}"
        for section, cls in typing.get_type_hints(Config).items()
        for f in dataclasses.fields(cls)
    }
    documented = {key: meaning for key, _, _, meaning, _ in rows()}
    assert set(documented) == keys
    assert not [k for k, m in documented.items() if not m], "keys without a meaning"
    assert not set(PLAIN) - keys, f"PLAIN names keys that no longer exist: {set(PLAIN) - keys}"


def test_defaults_and_flags_come_from_the_sources():
    table = {key: (tp, default, flags) for key, tp, default, _, flags in rows()}
    assert table["train.seq_length"] == (
        "int",
        f"`{Config().train.seq_length}`"[1:-1],
        "`--seq-length`",
    )
    assert "`--pipeline-model-parallel-blocks`" in table["parallel.pipeline_blocks"][2]
