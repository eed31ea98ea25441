"""Megatron-LM / Yuan 2.0 command-line flags and the config keys they become: the one table.

``yuanlfa-convert-args`` reads it to translate launch scripts and ``yuanlfa.cli.config_doc``
reads it for the "Megatron flag" column of docs/config.md, so the two cannot disagree. Every
flag falls in one of three kinds:

- ``MAP``: sets a config key (a few need a converter: values that depend on other flags);
- ``SAME``: says what yuanlfa always does (SwiGLU, RMSNorm, RoPE, no biases); nothing to write,
  but a value that contradicts it (a nonzero dropout, LayerNorm) becomes unconvertible;
- ``NO``: has no equivalent here; the reason is shown to the user.

Flags absent from the table are reported as unknown, never dropped. Torch-free; imports only
the config schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["map", "same", "no"]

# A converter gets the flag's values and all flags of the script (flag -> values) and returns
# {dotted key: value} to set, or a string: the reason it cannot be converted.
Converter = Callable[[list[str], dict[str, list[str]]], "dict[str, object] | str"]


@dataclass(frozen=True)
class Flag:
    flag: str
    kind: Kind
    # MAP: the dotted keys it sets (for the reference's column); SAME / NO: empty.
    keys: tuple[str, ...] = ()
    # MAP without a converter: the value a value-less flag sets (None: the flag's own value).
    const: object = None
    convert: Converter | None = None
    # SAME: the accepted values (None: any, e.g. a flag without a value); NO: the reason.
    accepted: tuple[str, ...] | None = None
    why: str = ""


def _one(values: list[str]) -> str:
    return values[0] if values else ""


def _data_path(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    if len(values) == 1:
        return {"data.path": values[0]}
    if len(values) % 2:
        return "--data-path with several prefixes needs weight, prefix pairs"
    return {"data.blend": list(values)}


def _tokenizer(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    kind = _one(values)
    model = _one(flags.get("--tokenizer-model-path", []) or flags.get("--tokenizer-model", []))
    if kind in ("YuanTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not model:
            return f"{kind} needs --tokenizer-model(-path); set data.tokenizer yourself"
        return {"data.tokenizer": f"sentencepiece:{model}"}
    if kind == "HuggingFaceTokenizer":
        if not model:
            return "HuggingFaceTokenizer needs --tokenizer-model; set data.tokenizer yourself"
        return {"data.tokenizer": f"huggingface:{model}"}
    if kind == "NullTokenizer":
        return "NullTokenizer (mock data) has no equivalent; yuanlfa's nearest is byte"
    return (
        f"tokenizer {kind!r} is not supported (sentencepiece:, huggingface: or byte); "
        "convert it to a tokenizer.json and use huggingface:DIR"
    )


def _decay_style(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    style = _one(values)
    if style in ("cosine", "linear", "constant"):
        return {"optim.lr_schedule": style}
    return f"lr decay style {style!r} is not implemented (cosine, linear, constant)"


def _warmup_fraction(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    # Megatron: warmup steps = fraction * decay steps (decay steps default to train iters).
    decay = _one(flags.get("--lr-decay-iters", []) or flags.get("--train-iters", []))
    if not decay:
        return "needs --lr-decay-iters or --train-iters to turn the fraction into steps"
    return {"optim.warmup_steps": int(float(_one(values)) * int(float(decay)))}


def _recompute(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    granularity = _one(values)
    if granularity in ("full", "selective"):
        return {"train.recompute": granularity}
    return f"recompute granularity {granularity!r} is unknown (full, selective)"


def _save(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    out: dict[str, object] = {"checkpoint.dir": _one(values)}
    if _one(flags.get("--load", [])) == _one(values):
        out["checkpoint.resume"] = True
    return out


def _load(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    if _one(flags.get("--save", [])) == _one(values):
        return {}  # written with --save: resume from checkpoint.dir
    return (
        "yuanlfa resumes only from checkpoint.dir; to start from another run's Megatron "
        "checkpoint, convert it (yuanlfa-reshard --to yuanlfa) and set checkpoint.init_from"
    )


def _attention_backend(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    backend = {"auto": "auto", "flash": "flash", "unfused": "math"}.get(_one(values))
    if backend is None:
        return f"attention backend {_one(values)!r} has no equivalent (auto, flash, unfused)"
    return {"model.attention_backend": backend}


def _virtual_stages(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    return {"parallel.virtual_stages": int(_one(values)), "parallel.schedule": "interleaved_1f1b"}


def _layers_per_virtual(values: list[str], flags: dict[str, list[str]]) -> dict[str, object] | str:
    layers = int(_one(flags.get("--num-layers", ["0"])))
    pp = int(_one(flags.get("--pipeline-model-parallel-size", ["1"])))
    per = int(_one(values))
    if not layers or layers % (pp * per):
        return "needs --num-layers divisible by pp * layers per virtual stage"
    return {
        "parallel.virtual_stages": layers // (pp * per),
        "parallel.schedule": "interleaved_1f1b",
    }


def _m(flag: str, key: str, const: object = None) -> Flag:
    return Flag(flag, "map", (key,), const=const)


def _c(flag: str, keys: tuple[str, ...], convert: Converter) -> Flag:
    return Flag(flag, "map", keys, convert=convert)


def _same(flag: str, why: str, *accepted: str) -> Flag:
    return Flag(flag, "same", accepted=accepted or None, why=why)


def _no(flag: str, why: str) -> Flag:
    return Flag(flag, "no", why=why)


_LOGGING = "yuanlfa logs loss, lr, grad norm, throughput and memory at logging.log_interval"
_FUSION = "a kernel-fusion switch; yuanlfa picks its kernels itself (same results)"

FLAGS: tuple[Flag, ...] = (
    # model
    _m("--num-layers", "model.num_layers"),
    _m("--hidden-size", "model.hidden_size"),
    _m("--num-attention-heads", "model.num_heads"),
    _m("--ffn-hidden-size", "model.ffn_hidden_size"),
    _m("--rotary-base", "model.rope_base"),
    _m("--norm-epsilon", "model.norm_eps"),
    _m("--layernorm-epsilon", "model.norm_eps"),
    _m("--init-method-std", "model.init_std"),
    _m("--untie-embeddings-and-output-weights", "model.tie_embeddings", const=False),
    _m("--use-lf-gate", "model.lfa", const=True),
    _m("--reset-attention-mask", "model.document_attention", const=True),
    _m("--use-flash-attn", "model.attention_backend", const="flash"),
    _c("--attention-backend", ("model.attention_backend",), _attention_backend),
    _same("--lf-conv2d-group", "LFA's convolutions are ungrouped, as released", "1"),
    _same("--lf-conv2d-num-pad", "LFA's kernel-2 causal padding, as released", "1"),
    _same("--swiglu", "the MLP is always SwiGLU"),
    _same("--disable-bias-linear", "linear layers never have biases"),
    _same("--norm-dtype", "the norm is always RMSNorm", "RMSNorm"),
    _same("--normalization", "the norm is always RMSNorm", "RMSNorm"),
    _same("--position-embedding-type", "positions are always RoPE", "rope"),
    _same("--use-rotary-position-embeddings", "positions are always RoPE"),
    _same("--no-position-embedding", "RoPE only, no learned position table"),
    _same("--no-embedding-dropout", "there is no dropout"),
    # Megatron's unfused attention; with --use-flash-attn, Yuan's fork drops through
    # --flash-attn-drop instead, which is what model.attention_dropout mirrors.
    _same(
        "--attention-dropout",
        "only 0 is taken as is; the dropout yuanlfa mirrors is --flash-attn-drop",
        "0",
        "0.0",
    ),
    _same("--hidden-dropout", "there is no dropout", "0", "0.0"),
    _same("--max-position-embeddings", "RoPE has no position table; train.seq_length is used"),
    _same("--make-vocab-size-divisible-by", "the vocabulary is padded to lcm(128, tp)", "128"),
    _same("--attention-softmax-in-fp32", "softmax runs in fp32"),
    _same("--apply-query-key-layer-scaling", "scaling by 1/sqrt(head dim), the same result"),
    _same("--use-mcore-models", "one model implementation"),
    _same("--transformer-impl", "one model implementation"),
    _same("--data-impl", "the .bin/.idx files are memory-mapped", "mmap"),
    _same("--distributed-backend", "nccl on GPU, gloo on CPU", "nccl"),
    _same("--accumulate-allreduce-grads-in-fp32", "gradients accumulate and reduce in fp32"),
    _same("--pipeline-model-parallel-method", "a block list sets the split", "block"),
    _same("--no-masked-softmax-fusion", _FUSION),
    _same("--no-bias-gelu-fusion", _FUSION),
    _same("--no-bias-swiglu-fusion", _FUSION),
    _same("--no-bias-dropout-fusion", _FUSION),
    _same("--no-gradient-accumulation-fusion", _FUSION),
    _same("--no-rope-fusion", _FUSION),
    _same("--cross-entropy-loss-fusion", _FUSION),
    _m("--flash-attn-drop", "model.attention_dropout"),
    _no("--fp16", "fp16 with loss scaling is not implemented; use --bf16 (train.precision: bf16)"),
    _no("--group-query-attention", "grouped-query attention is not implemented"),
    _no("--num-query-groups", "grouped-query attention is not implemented"),
    _no("--kv-channels", "the head size is always hidden_size / num_heads"),
    _no("--rotary-percent", "RoPE always rotates the whole head"),
    _no("--num-experts", "mixture of experts is not implemented"),
    # parallelism
    _m("--tensor-model-parallel-size", "parallel.tp"),
    _m("--pipeline-model-parallel-size", "parallel.pp"),
    _m("--pipeline-model-parallel-blocks", "parallel.pipeline_blocks"),
    _m("--pipeline-model-parallel-layout", "parallel.pipeline_layout"),
    _m("--sequence-parallel", "parallel.sequence_parallel", const=True),
    _m("--overlap-grad-reduce", "parallel.overlap_grad_reduce", const=True),
    _m("--ddp-bucket-size", "parallel.grad_bucket_size"),
    _m("--use-distributed-optimizer", "optim.distributed", const=True),
    _c("--virtual-pipeline-model-parallel-size", ("parallel.virtual_stages",), _virtual_stages),
    _c(
        "--num-layers-per-virtual-pipeline-stage",
        ("parallel.virtual_stages",),
        _layers_per_virtual,
    ),
    _no("--context-parallel-size", "context parallelism is not implemented (parallel.cp is 1)"),
    _no("--expert-model-parallel-size", "mixture of experts is not implemented"),
    _no("--overlap-param-gather", "the distributed optimizer gathers parameters after the step"),
    _no("--tp-comm-overlap", "tensor-parallel communication is not overlapped with GEMMs"),
    # optimizer and schedule
    _m("--lr", "optim.lr"),
    _m("--min-lr", "optim.min_lr"),
    _m("--weight-decay", "optim.weight_decay"),
    _m("--adam-beta1", "optim.beta1"),
    _m("--adam-beta2", "optim.beta2"),
    _m("--adam-eps", "optim.eps"),
    _m("--clip-grad", "optim.clip_grad"),
    _m("--lr-warmup-iters", "optim.warmup_steps"),
    _c("--lr-warmup-fraction", ("optim.warmup_steps",), _warmup_fraction),
    _m("--lr-decay-iters", "optim.decay_steps"),
    _c("--lr-decay-style", ("optim.lr_schedule",), _decay_style),
    _same("--optimizer", "the optimizer is AdamW", "adam"),
    _no("--lr-warmup-samples", "warmup is counted in steps (--lr-warmup-iters)"),
    _no("--lr-decay-samples", "decay is counted in steps (--lr-decay-iters)"),
    _no("--lr-warmup-init", "warmup starts from 0"),
    _no("--rampup-batch-size", "the batch size is constant (no ramp-up)"),
    _no("--step-batch-size-schedule", "the batch size is constant (no ramp-up)"),
    # training
    _m("--micro-batch-size", "train.micro_batch_size"),
    _m("--global-batch-size", "train.global_batch_size"),
    _m("--seq-length", "train.seq_length"),
    _m("--train-iters", "train.steps"),
    _m("--seed", "train.seed"),
    _m("--eval-interval", "train.eval_interval"),
    _m("--eval-iters", "train.eval_iters"),
    _m("--exit-interval", "train.exit_interval"),
    _c("--recompute-granularity", ("train.recompute",), _recompute),
    _m("--recompute-activations", "train.recompute", const="selective"),
    _m("--recompute-method", "train.recompute_method"),
    _m("--recompute-num-layers", "train.recompute_num_layers"),
    _no("--train-samples", "training length is counted in steps (--train-iters)"),
    _no("--exit-duration-in-mins", "use train.exit_interval (steps) instead"),
    # precision: Megatron's --bf16 keeps bf16 parameters with fp32 main weights and grads.
    Flag(
        "--bf16",
        "map",
        ("train.precision", "train.param_dtype"),
        convert=lambda v, f: {"train.precision": "bf16", "train.param_dtype": "bf16"},
    ),
    # data
    _c("--data-path", ("data.path", "data.blend"), _data_path),
    _m("--split", "data.split"),
    _c("--tokenizer-type", ("data.tokenizer",), _tokenizer),
    _same("--tokenizer-model-path", "read with --tokenizer-type"),
    _same("--tokenizer-model", "read with --tokenizer-type"),
    _m("--fim-rate", "data.fim_rate"),
    _m("--fim-spm-rate", "data.fim_spm_rate"),
    _m("--eod-mask-loss", "data.eod_mask_loss", const=True),
    _m("--reset-position-ids", "data.reset_position_ids", const=True),
    _m("--num-workers", "data.num_workers"),
    _m("--data-cache-path", "data.cache_dir"),
    _no("--vocab-file", "GPT-2 BPE vocab/merges files are not read; use huggingface:DIR"),
    _no("--merge-file", "GPT-2 BPE vocab/merges files are not read; use huggingface:DIR"),
    _no("--mock-data", "mock data is not supported; data.path: null uses the embedded corpus"),
    _no("--train-data-path", "separate train/valid/test files: use data.path with data.split"),
    _no("--valid-data-path", "separate train/valid/test files: use data.path with data.split"),
    _no("--test-data-path", "separate train/valid/test files: use data.path with data.split"),
    # checkpoints
    _c("--save", ("checkpoint.dir", "checkpoint.resume"), _save),
    _c("--load", (), _load),
    _m("--save-interval", "checkpoint.interval"),
    _no("--no-load-optim", "resuming restores everything; checkpoint.init_from loads only weights"),
    _no("--no-load-rng", "resuming restores everything; checkpoint.init_from loads only weights"),
    _no("--finetune", "use checkpoint.init_from (weights only, step 0)"),
    _no("--ckpt-format", "checkpoints are torch.distributed.checkpoint with meta.json"),
    _no("--use-dist-ckpt", "checkpoints are always layout-free (torch.distributed.checkpoint)"),
    # logging
    _m("--log-interval", "logging.log_interval"),
    _m("--tensorboard-dir", "logging.tensorboard_dir"),
    _no("--tensorboard-log-interval", f"TensorBoard follows logging.log_interval; {_LOGGING}"),
    _no("--tensorboard-queue-size", _LOGGING),
    _no("--log-timers-to-tensorboard", _LOGGING),
    _no("--log-batch-size-to-tensorboard", _LOGGING),
    _no("--log-memory-to-tensorboard", _LOGGING),
    _no("--log-world-size-to-tensorboard", _LOGGING),
    _no("--log-validation-ppl-to-tensorboard", _LOGGING),
    _no("--log-throughput", _LOGGING),
    _no("--timing-log-level", _LOGGING),
    _no("--wandb-project", "Weights & Biases is not supported; use logging.jsonl or TensorBoard"),
    _no("--wandb-exp-name", "Weights & Biases is not supported; use logging.jsonl or TensorBoard"),
)

BY_FLAG: dict[str, Flag] = {f.flag: f for f in FLAGS}


# Megatron defaults that differ from yuanlfa's fixed model, checked when the flag is ABSENT: a
# Megatron script without --swiglu trains a GeLU MLP, which yuanlfa cannot build.
ABSENT: tuple[tuple[tuple[str, ...], str], ...] = (
    (("--swiglu",), "without it Megatron's MLP is GeLU; yuanlfa's is always SwiGLU"),
    (("--disable-bias-linear",), "without it Megatron's linear layers have biases; yuanlfa's not"),
    (
        ("--normalization", "--norm-dtype"),
        "without it Megatron normalizes with LayerNorm; yuanlfa always with RMSNorm",
    ),
    (
        ("--position-embedding-type", "--use-rotary-position-embeddings"),
        "without it Megatron learns absolute positions; yuanlfa always uses RoPE",
    ),
    (
        ("--attention-dropout", "--flash-attn-drop"),
        "Megatron's default attention dropout is 0.1; yuanlfa's model.attention_dropout is 0",
    ),
    (("--hidden-dropout",), "Megatron's default hidden dropout is 0.1; yuanlfa has none"),
)
# Absent flags whose Megatron default differs from yuanlfa's default but maps: written out.
ABSENT_DEFAULTS: tuple[tuple[str, str, object], ...] = (
    ("--reset-position-ids", "data.reset_position_ids", False),
    ("--use-lf-gate", "model.filter", "none"),
    ("--split", "data.split", "969,30,1"),
)


def flags_for_key(key: str) -> list[str]:
    """The flags that set a dotted config key (for docs/config.md)."""
    return [f.flag for f in FLAGS if f.kind == "map" and key in f.keys]
