"""Configuration: frozen dataclasses, a strict YAML loader, dotted overrides and validation.

Each component receives only its own sub-config. YAML enters the program only through
:func:`load_config`; everything after that works on typed, validated, immutable objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line naming the field."""


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 24
    hidden_size: int = 2048
    num_heads: int = 32
    # None means 4 * hidden_size (Yuan 2.0's SwiGLU width).
    ffn_hidden_size: int | None = None
    # None means the tokenizer's vocabulary padded to a multiple of lcm(128, tp).
    vocab_size: int | None = 135040
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    # false: no filter (plain attention), the same as filter: none (kept for older configs).
    lfa: bool = True
    # The local filter in front of the Q/K projections, by registered name: lfa (the paper's
    # two convolutions + RMSNorm, DESIGN.md 3), lfa_no_norm, conv (one causal convolution of
    # filter_kernel taps, + residual and RMSNorm), none (plain attention), or a plug-in's name.
    filter: str = "lfa"
    # Taps of the conv filter (the paper's ablation: 1, 2, 3, 7); plug-ins may read it too.
    filter_kernel: int = 2
    # The core attention (softmax(q k^T) v on [s, b, heads, d]) by registered name: causal
    # (attention_backend picks the kernel) or a plug-in's name.
    attention: str = "causal"
    # Python files (path/to/file.py) or importable module names imported before the model is
    # built, on every rank, so that their @register_filter / @register_attention decorators run.
    plugins: tuple[str, ...] = ()
    # Restart the filter at document starts inside packed samples (the reference does not).
    lfa_reset_at_doc_start: bool = False
    # Each token attends only to its own document inside a packed sample (Megatron's
    # --reset-attention-mask); documents start where position ids restart at 0.
    document_attention: bool = False
    lfa_impl: Literal["auto", "reference", "triton"] = "auto"
    attention_backend: Literal["auto", "sdpa", "flash", "math"] = "auto"
    # Tokens per block of the block-wise cross entropy used under tensor parallelism (full fp32
    # logits are never materialized there).
    loss_block_size: int = 2048

    def __post_init__(self) -> None:
        # Configs rebuilt from JSON (checkpoint manifests) carry lists; keep the config hashable.
        if not isinstance(self.plugins, tuple):
            object.__setattr__(self, "plugins", tuple(self.plugins))

    @property
    def filter_name(self) -> str:
        """The filter the model uses: ``filter``, or none when ``lfa`` is false."""
        return self.filter if self.lfa else "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # None: derived from the world size as world // (tp * pp * cp).
    dp: int | None = None
    cp: int = 1
    # Layers per stage (Yuan style), or "auto" for the balancer's split; None: even.
    pipeline_blocks: tuple[int, ...] | Literal["auto"] | None = None
    # Megatron-style layout string ("Et*2|t*3|t*3L"); exclusive with pipeline_blocks.
    pipeline_layout: str | None = None
    virtual_stages: int = 1
    sequence_parallel: bool = False
    # gpipe and 1f1b run one stage per rank; interleaved_1f1b and zero_bubble (torch's
    # interleaved zero-bubble) run virtual_stages stages per rank; zbv (torch's ZBV zero-bubble)
    # and dualpipev (DualPipeV) run 2, V-shaped. Specs: yuanlfa.layout.schedules.
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev"] = (
        "1f1b"
    )
    rank_order: Literal["tp-dp-pp", "tp-pp-dp", "dp-tp-pp"] = "tp-dp-pp"
    # Start each gradient bucket's dp reduction during the last backward pass, as soon as its
    # gradients are complete (Megatron's --overlap-grad-reduce); false: all after backward.
    overlap_grad_reduce: bool = True
    # Elements per gradient bucket (Megatron's --ddp-bucket-size default).
    grad_bucket_size: int = 40_000_000


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 2e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 1900
    # None: decay over train.steps.
    decay_steps: int | None = None
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    distributed: bool = False
    # None: fused AdamW where torch supports it on the device.
    fused: bool | None = None


@dataclass(frozen=True)
class DataConfig:
    # A .bin/.idx prefix; None means the embedded default corpus (tokenized once into a cache).
    path: str | None = None
    # byte, sentencepiece:PATH (a .model file) or huggingface:PATH (a tokenizer.json directory).
    tokenizer: str = "byte"
    split: str = "98,1,1"
    cache_dir: str | None = None
    # Fill-in-the-middle: the share of documents rewritten (Yuan 2.0: 0.5), and of those the
    # share in SPM rather than PSM order (Yuan 2.0: 0.5). Character-level, deterministic per
    # sample. 0 turns it off.
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    # No loss on predicting <eod> (Megatron's --eod-mask-loss).
    eod_mask_loss: bool = False
    # Several datasets mixed by weight instead of data.path, Megatron's --data-path form:
    # [0.3, /data/code, 0.7, /data/text] (each a .bin/.idx prefix; each split by data.split).
    blend: tuple[str, ...] = ()
    # Position ids restart at 0 after each <eod> (Megatron's --reset-position-ids); the model's
    # document-aware options read document starts from them.
    reset_position_ids: bool = True
    # Supervised fine-tuning: loss only on the tokens after each document's first <sep> (the
    # prompt and the separator carry none); documents without <sep> are trained on whole.
    sft: bool = False
    # Processes that read and pack samples ahead of the training loop per rank (0: in the
    # training process). Samples do not depend on it.
    num_workers: int = 2
    # Keep the document order, sample and shuffle indices as .npy files under
    # data.cache_dir/index (memory-mapped on later runs, as Megatron caches them).
    cache_index: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    seed: int = 1234
    # Compute precision: bf16 autocast (auto: on GPU), or fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Parameter (and gradient) storage. bf16 halves weight memory; the optimizer then keeps fp32
    # master weights (sharded over dp with optim.distributed) and accumulates gradients in fp32.
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Evaluate on the held-out split every N steps (0: only at the end).
    eval_interval: int = 0
    eval_iters: int = 4
    # Stop the run (instead of skipping the step) when the gradients hold inf or NaN.
    stop_on_nan: bool = False
    # Activation recompute: none, selective (core attention only) or full (whole layers).
    recompute: Literal["none", "selective", "full"] = "none"
    # Per pipeline rank (pp entries), overriding recompute: early stages hold more microbatches
    # in flight under 1F1B, so they gain most from recomputing, e.g. [full, selective, none].
    recompute_stages: tuple[Literal["none", "selective", "full"], ...] | None = None
    # Exit (after saving a checkpoint when checkpoint.dir is set) once the step count is a
    # multiple of this (0: never); like Megatron's --exit-interval, for jobs in time slots.
    exit_interval: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None
    interval: int = 0
    resume: bool = False
    keep_last: int = 2
    save_at_end: bool = True
    # Initialize the model's weights (not the optimizer or the step) from this checkpoint, e.g.
    # one imported with yuanlfa-reshard --to yuanlfa; ignored when resuming from checkpoint.dir.
    init_from: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    jsonl: str | None = None
    tensorboard_dir: str | None = None
    log_interval: int = 1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
        return value
    if origin is tuple:
        (elem,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown key '{full}'{hint}; valid keys here: {valid}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        full = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, data[name], full)
        else:
            kwargs[name] = _coerce(data[name], tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is YAML so lists and numbers keep their types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of ``data`` with dotted overrides applied; unknown keys fail later."""
    data = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def config_from_dict(data: dict | None, overrides: typing.Iterable[str] = ()) -> Config:
    cfg = _from_dict(Config, apply_overrides(data or {}, overrides), "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config strictly, apply ``--set`` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; see configs/ for presets")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(data or {}, overrides)


def config_to_dict(cfg: Any) -> dict:
    """Plain-data form (tuples as lists) for JSON manifests and logs."""
    out = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [fix(x) for x in v]
        return v

    return fix(out)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value is None or value > 0, f"{section}.{name}: must be > 0, got {value}")


def _validate_tokenizer(spec: str) -> None:
    kind, _, path = spec.partition(":")
    if kind == "byte" and not path:
        return
    _require(
        kind in ("sentencepiece", "huggingface") and bool(path),
        f"data.tokenizer: {spec!r} is not a tokenizer; use byte, sentencepiece:PATH/TO/x.model "
        "or huggingface:PATH/TO/DIR",
    )
    _require(
        os.path.exists(path),
        f"data.tokenizer: {path} not found; train a model with yuanlfa-train-tokenizer or fix "
        "the path",
    )


def validate(cfg: Config) -> None:
    """Check each section and the relations between sections; raise ConfigError on the first."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
    _positive("model", m, "num_layers", "hidden_size", "num_heads", "ffn_hidden_size")
    _positive("model", m, "vocab_size", "rope_base", "norm_eps", "init_std", "loss_block_size")
    _require(
        m.hidden_size % m.num_heads == 0,
        f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}",
    )
    _require(
        m.head_dim % 2 == 0,
        f"model.hidden_size / model.num_heads = {m.head_dim} must be even for RoPE",
    )
    _require(
        m.hidden_size % 2 == 0,
        f"model.hidden_size: {m.hidden_size} must be even (LFA halves the channels)",
    )
    _validate_model_components(m)

    _positive("parallel", p, "tp", "pp", "dp", "cp", "virtual_stages", "grad_bucket_size")
    _require(p.cp == 1, "parallel.cp: context parallelism is reserved; set it to 1")
    _require(
        m.num_heads % p.tp == 0,
        f"parallel.tp: {p.tp} does not divide model.num_heads={m.num_heads}",
    )
    _require(
        m.ffn_size % p.tp == 0,
        f"parallel.tp: {p.tp} does not divide the ffn size {m.ffn_size}",
    )
    if m.vocab_size is not None:
        _require(
            m.vocab_size % p.tp == 0,
            f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tp={p.tp}; "
            "pad it to a multiple of 128 * tp",
        )
    _require(
        p.virtual_stages == 1 or p.pp > 1,
        "parallel.virtual_stages: needs parallel.pp > 1",
    )
    _require(
        p.pipeline_layout is None or p.pipeline_blocks is None,
        "parallel.pipeline_layout: give either pipeline_layout or pipeline_blocks, not both",
    )
    if p.pipeline_blocks is not None and p.pipeline_blocks != "auto":
        blocks = p.pipeline_blocks
        stages = p.pp * p.virtual_stages
        _require(
            len(blocks) == stages,
            f"parallel.pipeline_blocks: has {len(blocks)} entries but parallel.pp * "
            f"parallel.virtual_stages = {stages}",
        )
        _require(
            all(b >= 0 for b in blocks),
            f"parallel.pipeline_blocks: entries must be >= 0, got {list(blocks)}",
        )
        _require(
            sum(blocks) == m.num_layers,
            f"parallel.pipeline_blocks: sums to {sum(blocks)} but model.num_layers = "
            f"{m.num_layers}",
        )
    elif p.pipeline_blocks is None and p.pipeline_layout is None and p.pp * p.virtual_stages > 1:
        _require(
            m.num_layers % (p.pp * p.virtual_stages) == 0,
            f"parallel.pp: model.num_layers={m.num_layers} is not divisible by "
            f"{p.pp * p.virtual_stages} stages; give parallel.pipeline_blocks (a list, or auto) "
            "or parallel.pipeline_layout",
        )
    _require(
        p.virtual_stages == 1 or p.schedule not in ("gpipe", "1f1b"),
        f"parallel.schedule: {p.schedule} runs one stage per rank but parallel.virtual_stages = "
        f"{p.virtual_stages}; use interleaved_1f1b or zero_bubble, or set virtual_stages=1",
    )
    _require(
        p.virtual_stages == 2 or p.schedule not in ("zbv", "dualpipev"),
        f"parallel.schedule: {p.schedule} runs 2 stages per rank (V-shaped); set "
        f"parallel.virtual_stages: 2, got {p.virtual_stages}",
    )
    # DualPipeV mixes full and split backwards: a parameter's gradients do not arrive once per
    # microbatch through autograd's hook, which the reduction overlapping backward counts on.
    _require(
        p.schedule != "dualpipev" or (p.dp or 1) == 1 or not p.overlap_grad_reduce,
        "parallel.overlap_grad_reduce: dualpipev with parallel.dp > 1 needs "
        "overlap_grad_reduce: false (its split backwards bypass the gradient hooks)",
    )
    _require(
        not p.sequence_parallel or p.tp > 1,
        "parallel.sequence_parallel: needs parallel.tp > 1",
    )

    _positive("optim", o, "lr", "eps", "decay_steps")
    for name in ("min_lr", "weight_decay", "clip_grad", "warmup_steps"):
        value = getattr(o, name)
        _require(value >= 0, f"optim.{name}: must be >= 0, got {value}")
    _require(o.min_lr <= o.lr, f"optim.min_lr: {o.min_lr} is larger than optim.lr={o.lr}")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        _require(0.0 <= value < 1.0, f"optim.{name}: must be in [0, 1), got {value}")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
        value = getattr(o, name)
        _require(math.isfinite(value), f"optim.{name}: must be finite, got {value}")

    _positive("train", t, "steps", "micro_batch_size", "global_batch_size", "seq_length")
    _require(t.eval_interval >= 0, f"train.eval_interval: must be >= 0, got {t.eval_interval}")
    _require(t.eval_iters >= 0, f"train.eval_iters: must be >= 0, got {t.eval_iters}")
    _require(t.exit_interval >= 0, f"train.exit_interval: must be >= 0, got {t.exit_interval}")
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size: {t.global_batch_size} is not divisible by "
        f"train.micro_batch_size={t.micro_batch_size}",
    )
    if p.dp is not None:
        per_step = t.micro_batch_size * p.dp
        _require(
            t.global_batch_size % per_step == 0,
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size * parallel.dp = {per_step}",
        )
    _require(
        not p.sequence_parallel or t.seq_length // p.tp >= 2,
        f"train.seq_length: {t.seq_length} / parallel.tp = {t.seq_length // p.tp} tokens per "
        "sequence shard; sequence parallelism needs at least 2 (the LFA halo)",
    )
    _require(
        not p.sequence_parallel or t.seq_length % p.tp == 0,
        f"train.seq_length: {t.seq_length} is not divisible by parallel.tp={p.tp} "
        "(needed by sequence parallelism)",
    )

    if t.recompute_stages is not None:
        _require(
            len(t.recompute_stages) == p.pp,
            f"train.recompute_stages: has {len(t.recompute_stages)} entries but parallel.pp = "
            f"{p.pp}; give one mode (none, selective, full) per pipeline rank",
        )

    c = cfg.checkpoint
    _require(c.interval >= 0, f"checkpoint.interval: must be >= 0, got {c.interval}")
    _require(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    _require(
        not (c.resume and c.dir is None),
        "checkpoint.resume: needs checkpoint.dir to know where to resume from",
    )
    _require(
        not (c.interval > 0 and c.dir is None),
        "checkpoint.interval: needs checkpoint.dir",
    )
    _require(
        cfg.logging.log_interval >= 1,
        f"logging.log_interval: must be >= 1, got {cfg.logging.log_interval}",
    )
    _validate_split(cfg.data.split)
    _validate_tokenizer(cfg.data.tokenizer)
    for name in ("fim_rate", "fim_spm_rate"):
        value = getattr(cfg.data, name)
        _require(0.0 <= value <= 1.0, f"data.{name}: must be in [0, 1], got {value}")
    _validate_documents(cfg)


def _validate_model_components(m: ModelConfig) -> None:
    """The filter and core attention: names, plug-in files and what plug-ins declare."""
    _require(
        m.lfa or m.filter in ("lfa", "none"),
        f"model.lfa: false means no filter, but model.filter is {m.filter!r}; drop model.lfa "
        "and choose with model.filter (none for plain attention)",
    )
    _require(m.filter_kernel >= 1, f"model.filter_kernel: must be >= 1, got {m.filter_kernel}")
    _require(
        m.filter_kernel == 2 or m.filter_name not in ("lfa", "lfa_no_norm"),
        f"model.filter_kernel: {m.filter_kernel}, but LFA's two convolutions have kernel 2; "
        "use model.filter: conv for one convolution of another size",
    )
    # Imports the plug-ins (user code) and the model's registry, which needs torch: deferred so
    # that reading a config stays light until a model is described.
    from yuanlfa.model.registry import check_model_config

    check_model_config(m)


def _validate_documents(cfg: Config) -> None:
    """The data options and the model's document-aware options must agree."""
    d, m = cfg.data, cfg.model
    _require(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    _require(
        not (d.blend and d.path is not None),
        "data.blend: give either data.path (one dataset) or data.blend (weights and prefixes), "
        "not both",
    )
    if d.blend:
        from yuanlfa.data.blended import parse_blend

        parse_blend(d.blend)
    _require(
        not (d.sft and d.fim_rate > 0),
        "data.sft: fill-in-the-middle rewrites documents around their <sep>; set data.fim_rate=0 "
        "for fine-tuning",
    )
    for name in ("document_attention", "lfa_reset_at_doc_start"):
        _require(
            not getattr(m, name) or d.reset_position_ids,
            f"model.{name}: documents are found where position ids restart, which needs "
            "data.reset_position_ids=true",
        )
    _require(
        not (m.document_attention and m.filter_name != "none" and not m.lfa_reset_at_doc_start),
        "model.document_attention: the filter would still mix the previous document's last "
        "tokens into each document's first ones; set model.lfa_reset_at_doc_start=true too",
    )


def _validate_split(split: str) -> None:
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split: {split!r} must be comma-separated numbers") from None
    _require(
        len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
        f"data.split: {split!r} must be up to three non-negative weights (train,valid,test)",
    )


def resolve(cfg: Config, world_size: int, tokenizer_vocab: int | None = None) -> Config:
    """Fill the derived fields (dp from the world size, the padded vocabulary) and re-validate."""
    p, m = cfg.parallel, cfg.model
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"parallel: tp * pp * cp = {model_parallel} does not divide the world size "
            f"{world_size}; launch a multiple of {model_parallel} processes"
        )
    dp = world_size // model_parallel
    if p.dp is not None and p.dp != dp:
        raise ConfigError(
            f"parallel.dp: {p.dp} but world size {world_size} / (tp * pp * cp = "
            f"{model_parallel}) = {dp}; omit parallel.dp or launch {model_parallel * p.dp} "
            "processes"
        )
    vocab = m.vocab_size
    if vocab is None:
        if tokenizer_vocab is None:
            raise ConfigError("model.vocab_size: null needs a tokenizer to derive it from")
        # A multiple of 128 (not of 128 * tp as Megatron pads): the vocabulary, and so the
        # model, stays the same for every power-of-two tp, which keeps layouts interchangeable.
        multiple = math.lcm(128, p.tp)
        vocab = -(-tokenizer_vocab // multiple) * multiple
    elif tokenizer_vocab is not None and vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "set it to null to derive it"
        )
    cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(p, dp=dp),
        model=dataclasses.replace(m, vocab_size=vocab),
    )
    validate(cfg)
    return cfg
