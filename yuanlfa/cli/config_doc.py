"""Generate docs/config.md, the config reference, from the dataclasses in yuanlfa/config/schema.py.

Every key with its type, default, meaning (the comment above the field in schema.py) and the
Megatron-LM / Yuan 2.0 flags that set it (yuanlfa/config/megatron_flags.py, the table
yuanlfa-convert-args uses). tests/docs/test_config_doc.py fails when docs/config.md is stale:

    python -m yuanlfa.cli.config_doc --output docs/config.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from yuanlfa.config import schema
from yuanlfa.config.load import type_name
from yuanlfa.config.megatron_flags import flags_for_key
from yuanlfa.config.schema import Config

# Meanings of fields whose name says it all to a Megatron user, so schema.py carries no comment
# for them. A comment above the field in schema.py wins over this table.
PLAIN: dict[str, str] = {
    "model.num_layers": "Transformer layers.",
    "model.hidden_size": "Hidden size h.",
    "model.num_heads": "Attention heads (head size h / num_heads).",
    "model.rope_base": "RoPE base frequency.",
    "model.norm_eps": "RMSNorm epsilon (Yuan 2.0: 1e-6).",
    "model.init_std": "Standard deviation of the normal initialization.",
    "model.tie_embeddings": "The output head shares the input embedding's weights.",
    "model.lfa_impl": "LFA kernels: triton on CUDA, reference (plain torch), or auto.",
    "model.attention_backend": "Core attention kernel: sdpa, flash (flash-attn), math, or auto.",
    "parallel.tp": "Tensor-parallel ranks.",
    "parallel.pp": "Pipeline-parallel ranks.",
    "parallel.cp": "Context parallelism: reserved, must be 1.",
    "parallel.virtual_stages": "Pipeline stages per rank (interleaved and zero-bubble schedules).",
    "parallel.sequence_parallel": "Shard activations over tp along the sequence (needs tp > 1).",
    "parallel.rank_order": "Order of ranks, fastest-varying first (keeps tp inside a node).",
    "optim.lr": "Peak learning rate.",
    "optim.min_lr": "Learning rate at the end of the decay.",
    "optim.weight_decay": "AdamW weight decay.",
    "optim.beta1": "AdamW beta1.",
    "optim.beta2": "AdamW beta2.",
    "optim.eps": "AdamW epsilon.",
    "optim.clip_grad": "Clip the global gradient norm to this (0: off).",
    "optim.warmup_steps": "Linear warmup steps.",
    "optim.lr_schedule": "Decay after warmup: cosine, linear or constant.",
    "optim.distributed": "Shard optimizer states and fp32 master weights over dp (ZeRO-1).",
    "data.split": "Train, validation, test proportions of the documents.",
    "data.fim_spm_rate": "Of the documents fill-in-the-middle rewrites, the share in SPM order.",
    "data.cache_dir": "Where tokenized default corpus and index arrays are cached.",
    "train.steps": "Optimizer steps to train.",
    "train.micro_batch_size": "Samples per microbatch per data-parallel rank.",
    "train.global_batch_size": "Samples per optimizer step over all ranks.",
    "train.seq_length": "Tokens per sample.",
    "train.seed": "Seed of initialization, data order and the attention-dropout masks.",
    "train.device": "cpu, cuda, or auto (cuda when present).",
    "train.eval_iters": "Global batches per evaluation.",
    "checkpoint.dir": "Directory of step_N checkpoints and the latest pointer.",
    "checkpoint.interval": "Save every N steps (0: only at the end).",
    "checkpoint.resume": "Resume from checkpoint.dir/latest when it exists.",
    "checkpoint.keep_last": "Checkpoints kept; older ones are deleted after a save.",
    "checkpoint.save_at_end": "Save when training finishes.",
    "logging.jsonl": "Write one JSON record per step to this file.",
    "logging.tensorboard_dir": "Write TensorBoard scalars here.",
    "logging.log_interval": "Log every N steps.",
}


def _type(tp: Any) -> str:
    # The loader's own wording of a type, with the table's column separator escaped.
    return type_name(tp).replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:_}".replace("_", "")
    return str(value)


def _comments(cls: type) -> dict[str, str]:
    """The comment lines right above each field of ``cls`` in schema.py, joined into one."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        text: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            text.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if text:
            out[node.target.id] = " ".join(text)
    return out


def rows() -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, meaning, Megatron flags) for every config key, in schema order."""
    out = []
    for section, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls, vars(schema))
        comments = _comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            meaning = comments.get(f.name) or PLAIN.get(key, "")
            flags = ", ".join(f"`{x}`" for x in flags_for_key(key)) or "-"
            out.append((key, _type(hints[f.name]), _default(f), meaning, flags))
    return out


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `yuanlfa/config/schema.py` by `python -m yuanlfa.cli.config_doc "
        "--output docs/config.md`; do not edit by hand (`tests/docs/test_config_doc.py` fails "
        "when this file is out of date). The Megatron column is the table "
        "`yuanlfa-convert-args` uses (`yuanlfa/config/megatron_flags.py`).",
        "",
        "Set keys in a YAML file (`section: {key: value}`) or on the command line with "
        "`--set section.key=value`. Unknown keys are refused with the closest valid name.",
    ]
    current = None
    for key, tp, default, meaning, flags in rows():
        section = key.split(".", 1)[0]
        if section != current:
            current = section
            lines += [
                "",
                f"## {section}",
                "",
                "| key | type | default | meaning | Megatron flag |",
                "|---|---|---|---|---|",
            ]
        cell = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {tp} | `{default}` | {cell} | {flags} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yuanlfa.cli.config_doc", description=__doc__)
    parser.add_argument("--output", help="write here (default: stdout)")
    args = parser.parse_args(argv)
    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
