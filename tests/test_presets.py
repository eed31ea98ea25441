"""The presets are Yuan 2.0's released recipes: every flag of its launch scripts that this
library expresses holds the script's value in the preset, on a line whose comment names the flag.

FLAGS are facts copied from github.com/IEIT-Yuan/Yuan-2.0, examples/pretrain_yuan2.0_2.1B.sh,
pretrain_yuan2.0_51B.sh and pretrain_yuan2.0_102B.sh: (flag, its value in the script as written,
None for a switch that is present, the config key that mirrors it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from yuanlfa.config import load_config

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    ("--tensor-model-parallel-size", "1", "parallel.tp"),
    ("--use-lf-gate", None, "model.lfa"),
    ("--flash-attn-drop", "0.1", "model.attention_dropout"),
    ("--fim-rate", "0.5", "data.fim_rate"),
    ("--fim-spm-rate", "0.5", "data.fim_spm_rate"),
    ("--reset-position-ids", None, "data.reset_position_ids"),
    ("--adam-beta1", "0.9", "optim.beta1"),
    ("--adam-beta2", "0.95", "optim.beta2"),
    ("--lr-decay-style", "cosine", "optim.lr_schedule"),
    ("--weight-decay", "1e-1", "optim.weight_decay"),
    ("--clip-grad", "1.0", "optim.clip_grad"),
    ("--recompute-granularity", "full", "train.recompute"),
    ("--bf16", None, "train.precision"),
    ("--split", "10,0,0", "data.split"),
    ("--eval-interval", "1000000", "train.eval_interval"),
    ("--eval-iters", "10", "train.eval_iters"),
    ("--save-interval", "10000", "checkpoint.interval"),
    ("--log-interval", "1", "logging.log_interval"),
    ("--num-workers", "2", "data.num_workers"),
    ("--tokenizer-type", "YuanTokenizer", "data.tokenizer"),
]
FLAGS = {
    "yuan2-2b": COMMON
    + [
        ("--pipeline-model-parallel-size", "1", "parallel.pp"),
        ("--num-layers", "24", "model.num_layers"),
        ("--hidden-size", "2048", "model.hidden_size"),
        ("--num-attention-heads", "32", "model.num_heads"),
        ("--seq-length", "8192", "train.seq_length"),
        ("--micro-batch-size", "2", "train.micro_batch_size"),
        ("--global-batch-size", "384", "train.global_batch_size"),
        ("--lr", "0.0002", "optim.lr"),
        ("--min-lr", "2.0e-5", "optim.min_lr"),
        ("--train-iters", "95367", "train.steps"),
        ("--lr-decay-iters", "95367", "optim.decay_steps"),
        ("--lr-warmup-iters", "1900", "optim.warmup_steps"),
        ("--recompute-method", "uniform", "train.recompute_method"),
        ("--recompute-num-layers", "1", "train.recompute_num_layers"),
    ],
    "yuan2-51b": COMMON
    + [
        ("--pipeline-model-parallel-size", "16", "parallel.pp"),
        (
            "--pipeline-model-parallel-blocks",
            "2,2,2,2,2,3,3,3,3,3,3,3,3,3,3,2",
            "parallel.pipeline_blocks",
        ),  # fmt: skip
        ("--num-layers", "42", "model.num_layers"),
        ("--hidden-size", "8192", "model.hidden_size"),
        ("--num-attention-heads", "64", "model.num_heads"),
        ("--seq-length", "4096", "train.seq_length"),
        ("--micro-batch-size", "1", "train.micro_batch_size"),
        ("--global-batch-size", "1152", "train.global_batch_size"),
        ("--lr", "0.00009", "optim.lr"),
        ("--min-lr", "0.9e-5", "optim.min_lr"),
        ("--train-iters", "63578", "train.steps"),
        ("--lr-decay-iters", "63578", "optim.decay_steps"),
        ("--lr-warmup-iters", "1300", "optim.warmup_steps"),
        ("--use-distributed-optimizer", None, "optim.distributed"),
        ("--recompute-method", "block", "train.recompute_method"),
        ("--recompute-num-layers", "1", "train.recompute_num_layers"),
    ],
    "yuan2-102b": COMMON
    + [
        ("--pipeline-model-parallel-size", "32", "parallel.pp"),
        (
            "--pipeline-model-parallel-blocks",
            "2,2,2,2,2,2,2,2,2,2,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,2,2",
            "parallel.pipeline_blocks",
        ),  # fmt: skip
        ("--num-layers", "84", "model.num_layers"),
        ("--hidden-size", "8192", "model.hidden_size"),
        ("--num-attention-heads", "64", "model.num_heads"),
        ("--seq-length", "4096", "train.seq_length"),
        ("--micro-batch-size", "1", "train.micro_batch_size"),
        ("--global-batch-size", "1152", "train.global_batch_size"),
        ("--lr", "0.00003", "optim.lr"),
        ("--min-lr", "0.3e-5", "optim.min_lr"),
        ("--train-iters", "63578", "train.steps"),
        ("--lr-decay-iters", "63578", "optim.decay_steps"),
        ("--lr-warmup-iters", "1300", "optim.warmup_steps"),
        ("--use-distributed-optimizer", None, "optim.distributed"),
        ("--recompute-method", "block", "train.recompute_method"),
        ("--recompute-num-layers", "2", "train.recompute_num_layers"),
    ],
}
# The 2.1B script has no --use-distributed-optimizer.
ABSENT = {"yuan2-2b": [("--use-distributed-optimizer", "optim.distributed")]}


def expected(flag: str, value: str | None, current):
    """What the config holds for ``flag value`` (a switch: on)."""
    if flag == "--bf16":
        return "bf16"
    if flag == "--tokenizer-type":
        return "sentencepiece:"  # YuanTokenizer is a SentencePiece model (prefix checked)
    if value is None:
        return True
    if flag == "--pipeline-model-parallel-blocks":
        return tuple(int(x) for x in value.split(","))
    if isinstance(current, str):
        return value
    if isinstance(current, int):
        return int(value)
    return float(value)


@pytest.mark.parametrize("preset", sorted(FLAGS))
def test_preset_mirrors_the_released_script(preset: str) -> None:
    path = ROOT / "configs" / f"{preset}.yaml"
    cfg = load_config(path)
    text = path.read_text()
    for flag, value, key in FLAGS[preset]:
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        want = expected(flag, value, current)
        if flag == "--tokenizer-type":
            assert current.startswith(want), (preset, flag, current)
        else:
            assert current == want, (preset, flag, current, want)
        # The key's line (or the comment lines just above it) names the flag.
        lines = text.splitlines()
        at = [i for i, line in enumerate(lines) if re.match(rf"\s+{name}:", line)]
        assert at, (preset, key)
        near = "\n".join(lines[max(at[0] - 3, 0) : at[0] + 1])
        assert flag in near, (preset, flag, key)
    for flag, key in ABSENT.get(preset, []):
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) is False, (preset, flag)
