"""yuanlfa-convert-args against the released Yuan 2.0 pretraining scripts and the presets.

The flag lists below are those of github:IEIT-Yuan/Yuan-2.0 examples/pretrain_yuan2.0_{2.1B,
51B,102B}.sh (commit 2f59b3f), copied verbatim except the ``<Specify path>`` placeholders.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from yuanlfa.cli.convert_args import convert, flags_from_script, main, parse_flags
from yuanlfa.config import config_from_dict, load_config
from yuanlfa.config.megatron_flags import FLAGS

ROOT = Path(__file__).resolve().parents[2]

_COMMON_HEAD = "--timing-log-level 2 --num-workers 2"
_LFA = """
    --use-lf-gate --lf-conv2d-group 1 --lf-conv2d-num-pad 1 --position-embedding-type rope
    --no-embedding-dropout --flash-attn-drop 0.1 --fim-rate 0.5 --fim-spm-rate 0.5
    --norm-dtype RMSNorm --attention-dropout 0 --hidden-dropout 0 --disable-bias-linear
    --reset-position-ids --use-flash-attn --swiglu --adam-beta1 0.9 --adam-beta2 0.95
"""
_TAIL = """
    --data-path /data/yuan_text_document --tokenizer-type YuanTokenizer
    --tokenizer-model-path /data/tokenizer.model --data-impl mmap --split 10,0,0
    --log-interval 1 --save-interval 10000 --eval-interval 1000000 --eval-iters 10
    --tensorboard-dir /runs/tb --tensorboard-log-interval 1 --tensorboard-queue-size 1000
    --log-timers-to-tensorboard --log-batch-size-to-tensorboard --log-memory-to-tensorboard
    --log-world-size-to-tensorboard --distributed-backend nccl --save /ckpt --load /ckpt
"""

YUAN_2B = f"""
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 {_COMMON_HEAD}
    --num-layers 24 --hidden-size 2048 --num-attention-heads 32 {_LFA}
    --seq-length 8192 --max-position-embeddings 8192 --micro-batch-size 2
    --global-batch-size 384 --lr 0.0002 --train-iters 95367 --lr-decay-iters 95367
    --lr-decay-style cosine --min-lr 2.0e-5 --weight-decay 1e-1 --lr-warmup-iters 1900
    --clip-grad 1.0 --recompute-method uniform --recompute-granularity full
    --recompute-num-layers 1 --bf16 {_TAIL}
"""
YUAN_51B = f"""
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 16
    --pipeline-model-parallel-method block
    --pipeline-model-parallel-blocks 2,2,2,2,2,3,3,3,3,3,3,3,3,3,3,2 {_COMMON_HEAD}
    --num-layers 42 --hidden-size 8192 --num-attention-heads 64 {_LFA}
    --seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1
    --global-batch-size 1152 --lr 0.00009 --train-iters 63578 --lr-decay-iters 63578
    --lr-decay-style cosine --min-lr 0.9e-5 --weight-decay 1e-1 --use-distributed-optimizer
    --lr-warmup-iters 1300 --clip-grad 1.0 --recompute-method block
    --recompute-granularity full --recompute-num-layers 1 --bf16 {_TAIL}
"""
YUAN_102B = f"""
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 32
    --pipeline-model-parallel-method block
    --pipeline-model-parallel-blocks
    2,2,2,2,2,2,2,2,2,2,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,2,2 {_COMMON_HEAD}
    --num-layers 84 --hidden-size 8192 --num-attention-heads 64 {_LFA}
    --seq-length 4096 --max-position-embeddings 4096 --micro-batch-size 1
    --global-batch-size 1152 --lr 0.00003 --train-iters 63578 --lr-decay-iters 63578
    --lr-decay-style cosine --min-lr 0.3e-5 --weight-decay 1e-1 --use-distributed-optimizer
    --lr-warmup-iters 1300 --clip-grad 1.0 --recompute-method block
    --recompute-granularity full --recompute-num-layers 2 --bf16 {_TAIL}
"""

# Preset keys the released scripts do not set or set otherwise, with why. The test fails on any
# other difference; these are reported to whoever aligns the presets.
KNOWN = {
    # No flag sets the device; the presets pin cuda (the scripts run on GPUs too).
    ("yuan2-2b", "train.device"): "no flag",
    ("yuan2-51b", "train.device"): "no flag",
    ("yuan2-102b", "train.device"): "no flag",
    # dp is derived from the world size in Megatron; the presets pin the paper's DP3.
    ("yuan2-51b", "parallel.dp"): "no flag",
    ("yuan2-102b", "parallel.dp"): "no flag",
    # The script's tokenizer path is the user's; the test converts with the byte tokenizer.
    ("yuan2-2b", "data.tokenizer"): "a path",
    ("yuan2-51b", "data.tokenizer"): "a path",
    ("yuan2-102b", "data.tokenizer"): "a path",
    # No flag gives the device's memory; the presets state the H100's for the fit check.
    ("yuan2-2b", "train.device_memory_gb"): "no flag",
    ("yuan2-51b", "train.device_memory_gb"): "no flag",
    ("yuan2-102b", "train.device_memory_gb"): "no flag",
    # The scripts' --save/--load are placeholders of the user's; the presets name a local dir.
    ("yuan2-2b", "checkpoint.dir"): "a path",
    ("yuan2-51b", "checkpoint.dir"): "a path",
    ("yuan2-102b", "checkpoint.dir"): "a path",
}

CASES = [("yuan2-2b", YUAN_2B), ("yuan2-51b", YUAN_51B), ("yuan2-102b", YUAN_102B)]


def _leaves(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        out += _leaves(value, full + ".") if isinstance(value, dict) else [full]
    return out


def _get(cfg, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("preset,flags", CASES)
def test_released_script_converts_to_the_preset(preset, flags):
    words = shlex.split(flags)
    conv = convert(words)
    data = conv.nested()
    data["data"]["tokenizer"] = "byte"  # the script's tokenizer file is not here
    converted = config_from_dict(data)
    path = ROOT / "configs" / f"{preset}.yaml"
    reference = load_config(path)
    held = _leaves(yaml.safe_load(path.read_text()))
    mismatches = {
        key: (_get(reference, key), _get(converted, key))
        for key in held
        if _get(reference, key) != _get(converted, key)
    }
    unexpected = {k: v for k, v in mismatches.items() if (preset, k) not in KNOWN}
    assert not unexpected, f"{preset}: preset vs converted script differ: {unexpected}"
    # What the presets hold that the scripts set: the model and the recipe.
    assert converted.model.num_layers == reference.model.num_layers
    assert converted.optim.min_lr == reference.optim.min_lr
    assert converted.parallel.pipeline_blocks == reference.parallel.pipeline_blocks


@pytest.mark.parametrize("preset,flags", CASES)
def test_every_flag_is_accounted_for(preset, flags):
    order, _ = parse_flags(shlex.split(flags))
    conv = convert(shlex.split(flags))
    seen = [s.split()[0] for s in conv.sources.values()]
    seen += [f.split()[0] for f, _ in conv.same + conv.unconverted]
    missing = [flag for flag in order if flag not in seen]
    assert not missing, f"dropped silently: {missing}"
    not_converted = {f.split()[0]: why for f, why in conv.unconverted}
    # Yuan trained with dropout inside flash-attn: model.attention_dropout.
    assert conv.values["model.attention_dropout"] == 0.1
    assert "--log-timers-to-tensorboard" in not_converted
    assert conv.values["data.fim_rate"] == 0.5
    assert conv.values["train.recompute"] == "full"
    assert conv.values["data.split"] == "10,0,0"


def test_unknown_and_contradicting_flags_are_listed():
    conv = convert(shlex.split("--num-layers 2 --frobnicate 3 --normalization LayerNorm --fp16"))
    reasons = dict(conv.unconverted)
    assert "unknown" in reasons["--frobnicate 3"]
    assert "RMSNorm" in reasons["--normalization LayerNorm"]
    assert "fp16" in reasons["--fp16"]
    # A plain Megatron GPT (no --swiglu, no --use-lf-gate) is not Yuan: say what differs.
    assert any("SwiGLU" in why for _, why in conv.unconverted)
    assert conv.values["model.filter"] == "none"


GPT3_SCRIPT = """#!/bin/bash
CHECKPOINT_PATH=$1 #<Specify path>
DATA_PATH=$5 #<Specify path and file prefix>_text_document
DISTRIBUTED_ARGS=(
    --nproc_per_node 8
    --nnodes 1
)
GPT_MODEL_ARGS=(
    --num-layers 96
    --hidden-size 12288
    --num-attention-heads 96
    --seq-length 2048
    --attention-backend auto # Can use (flash/fused/unfused/local)
)
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 1536
    --train-iters 500000
    --lr 6.0e-5
    --lr-warmup-fraction .001
    --lr-decay-iters 430000
)
MODEL_PARALLEL_ARGS=(
\t--tensor-model-parallel-size 8
\t--pipeline-model-parallel-size 16
)
DATA_ARGS=(
    --data-path $DATA_PATH
    --split 949,50,1
)
torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py \\
    ${GPT_MODEL_ARGS[@]} \\
    ${TRAINING_ARGS[@]} \\
    ${MODEL_PARALLEL_ARGS[@]} \\
    ${DATA_ARGS[@]} \\
    --save $CHECKPOINT_PATH
"""


def test_megatron_gpt_example_script():
    """The shape of Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (bash arrays,
    comments inside them, torchrun's own flags before the script)."""
    words = flags_from_script(GPT3_SCRIPT)
    assert "--nproc_per_node" not in words  # torchrun's, not the model's
    assert words[:2] == ["--num-layers", "96"]
    conv = convert(words)
    assert conv.values["parallel.tp"] == 8 and conv.values["parallel.pp"] == 16
    # Megatron: warmup = fraction * decay iters.
    assert conv.values["optim.warmup_steps"] == 430
    assert conv.values["data.path"] == "$5"
    assert conv.values["model.attention_backend"] == "auto"


def test_yuan_script_variables_and_cli(tmp_path, capsys):
    script = tmp_path / "pretrain.sh"
    script.write_text(
        'GPT_ARGS="\n    --num-layers 24 \\\n    --hidden-size 2048 \\\n'
        '    --num-attention-heads 32 \\\n    --swiglu \\\n    --bf16\n"\n'
        "torchrun $DISTRIBUTED_ARGS pretrain_yuan.py \\\n    $GPT_ARGS \\\n"
        "    --seq-length 512 --timing-log-level 2\n"
    )
    out = tmp_path / "out.yaml"
    assert main([str(script), "-o", str(out)]) == 0
    text = out.read_text()
    assert "--timing-log-level 2" in text  # listed, not dropped
    cfg = load_config(out)
    assert cfg.model.hidden_size == 2048 and cfg.train.seq_length == 512
    assert cfg.train.param_dtype == "bf16"
    assert main([str(tmp_path / "missing.sh")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not found" in err


def test_table_keys_exist_in_the_schema():
    from yuanlfa.config import Config

    cfg = Config()
    for flag in FLAGS:
        for key in flag.keys:
            section, name = key.split(".", 1)
            assert hasattr(getattr(cfg, section), name), f"{flag.flag} -> {key}: no such key"
