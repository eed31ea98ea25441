"""Validation of a config (each section, and the relations between sections) and resolution
of its derived fields (dp from the world size, the padded vocabulary)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from yuanlfa.config.blend import parse_blend
from yuanlfa.config.schema import Config, ConfigError, ModelConfig
from yuanlfa.config.split import configured_blocks


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


def tp_indivisible(tp: int, model: ModelConfig) -> str | None:
    """The tensor-parallel divisibility rule: heads, the ffn and the vocabulary are split over
    ``tp`` ranks. What ``tp`` does not divide, as words, or None."""
    for name, value, fix in (
        ("model.num_heads", model.num_heads, ""),
        ("the ffn size", model.ffn_size, ""),
        (
            "model.vocab_size",
            model.vocab_size,
            "; pad it to a multiple of lcm(128, tp), or leave it null to derive it",
        ),
    ):
        if value is not None and value % tp:
            return f"{tp} does not divide {name} = {value}{fix}"
    return None


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
    _require(
        0.0 <= m.attention_dropout < 1.0,
        f"model.attention_dropout: must be in [0, 1), got {m.attention_dropout}",
    )
    _require(
        m.attention_dropout == 0.0 or m.attention == "causal",
        f"model.attention_dropout: applies to the built-in causal attention, but model.attention "
        f"is {m.attention!r}; set it to 0 (a plug-in applies its own dropout)",
    )

    _positive("parallel", p, "tp", "pp", "dp", "cp", "virtual_stages", "grad_bucket_size")
    _require(p.cp == 1, "parallel.cp: context parallelism is reserved; set it to 1")
    problem = tp_indivisible(p.tp, m)
    _require(problem is None, f"parallel.tp: {problem}")
    _require(
        p.virtual_stages == 1 or p.pp > 1,
        "parallel.virtual_stages: needs parallel.pp > 1",
    )
    configured_blocks(p, m)
    _require(
        p.virtual_stages == 1 or p.schedule not in ("gpipe", "1f1b"),
        f"parallel.schedule: {p.schedule} runs one stage per rank but parallel.virtual_stages = "
        f"{p.virtual_stages}; use interleaved_1f1b or zero_bubble, or set virtual_stages=1",
    )
    # The full rules of each schedule (microbatch counts, pp >= 2 for V shapes) are its spec's
    # check (yuanlfa.layout.schedules), which the runner and planner call; config cannot import
    # layout, so the stage count of the V shapes is stated here too.
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
    _require(
        t.peak_tflops is None or (math.isfinite(t.peak_tflops) and t.peak_tflops > 0),
        f"train.peak_tflops: must be a positive number of TFLOP/s per device (e.g. 989 for an "
        f"H100 in bf16), got {t.peak_tflops}",
    )
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

    _require(
        t.recompute_num_layers >= 1,
        f"train.recompute_num_layers: must be >= 1, got {t.recompute_num_layers}",
    )
    _require(
        t.recompute_method == "block" or t.recompute_num_layers == 1,
        f"train.recompute_num_layers: {t.recompute_num_layers} with recompute_method uniform "
        "(checkpoints of several layers) is not implemented; use 1, or recompute_method: block",
    )
    _require(
        t.device_memory_gb is None or t.device_memory_gb > 0,
        f"train.device_memory_gb: must be > 0, got {t.device_memory_gb}",
    )

    c = cfg.checkpoint
    _require(c.interval >= 0, f"checkpoint.interval: must be >= 0, got {c.interval}")
    _require(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    _require(
        c.keep_every is None or c.keep_every >= 1,
        f"checkpoint.keep_every: must be >= 1 (or unset: keep only keep_last), got {c.keep_every}",
    )
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
    _validate_outer(cfg)
    _validate_cluster(cfg)
    _validate_emulate(cfg)
    _validate_split(cfg.data.split)
    _validate_tokenizer(cfg.data.tokenizer)
    for name in ("fim_rate", "fim_spm_rate"):
        value = getattr(cfg.data, name)
        _require(0.0 <= value <= 1.0, f"data.{name}: must be in [0, 1], got {value}")
    _validate_documents(cfg)


def _validate_outer(cfg: Config) -> None:
    """parallel.islands and the outer section (docs/islands.md)."""
    p, o, t = cfg.parallel, cfg.outer, cfg.train
    _require(p.islands >= 1, f"parallel.islands: must be >= 1, got {p.islands}")
    _require(o.sync_every >= 1, f"outer.sync_every: must be >= 1, got {o.sync_every}")
    _require(math.isfinite(o.lr) and o.lr > 0, f"outer.lr: must be a positive number, got {o.lr}")
    _require(0.0 <= o.momentum < 1.0, f"outer.momentum: must be in [0, 1), got {o.momentum}")
    _require(
        o.warm_start_steps >= 0,
        f"outer.warm_start_steps: must be >= 0 (0: no synchronous warm start), got "
        f"{o.warm_start_steps}",
    )
    _require(
        o.warm_start_steps == 0 or o.algorithm != "none",
        f"outer.warm_start_steps: {o.warm_start_steps} with algorithm none, whose every step is "
        "synchronous already; set it to 0 or use diloco / streaming_diloco",
    )
    _require(
        o.average_moments == "none" or o.algorithm == "diloco",
        f"outer.average_moments: {o.average_moments} needs algorithm diloco (with none the "
        "islands share one optimizer state already; streaming_diloco's fragments sync at "
        "different steps); set it to none",
    )
    _require(o.timeout_s > 0, f"outer.timeout_s: must be > 0, got {o.timeout_s}")
    _require(
        0.0 <= o.fragment_mix <= 1.0, f"outer.fragment_mix: must be in [0, 1], got {o.fragment_mix}"
    )
    _require(
        o.fragment_merge == "mix" or o.fragment_mix == 0.0,
        f"outer.fragment_mix: {o.fragment_mix} is only used with fragment_merge: mix; set it to "
        "0 or use fragment_merge: mix",
    )
    streaming = o.algorithm == "streaming_diloco"
    _require(
        not streaming or o.fragments is not None,
        "outer.fragments: streaming_diloco needs fragments (e.g. 2); or use algorithm: diloco",
    )
    _require(
        o.fragments is None or streaming,
        f"outer.fragments: only streaming_diloco uses fragments, algorithm is {o.algorithm}; "
        "remove it",
    )
    if o.fragments is not None:
        _require(o.fragments >= 1, f"outer.fragments: must be >= 1, got {o.fragments}")
        _require(
            o.fragments <= cfg.model.num_layers,
            f"outer.fragments: {o.fragments} fragments but model.num_layers = "
            f"{cfg.model.num_layers}; use at most one fragment per layer",
        )
        _require(
            o.sync_every % o.fragments == 0,
            f"outer.sync_every: {o.sync_every} is not divisible by outer.fragments = "
            f"{o.fragments} (fragment f starts at step f * sync_every / fragments)",
        )
    _require(
        0 <= o.fragment_delay < o.sync_every,
        f"outer.fragment_delay: must be in [0, sync_every = {o.sync_every}), got "
        f"{o.fragment_delay}",
    )
    _require(
        o.fragment_delay == 0 or streaming,
        "outer.fragment_delay: only streaming_diloco delays its exchanges; set it to 0",
    )
    host, sep, port = o.lighthouse.rpartition(":")
    _require(
        o.lighthouse == "auto" or (sep and host and port.isdigit()),
        f"outer.lighthouse: {o.lighthouse!r} is neither auto nor HOST:PORT (e.g. node0:29510)",
    )
    if o.algorithm != "none":
        _require(
            t.param_dtype == "fp32",
            f"train.param_dtype: {t.param_dtype} with outer.algorithm {o.algorithm} is not "
            "supported (the outer step works on the fp32 parameters); use fp32",
        )
    if p.dp is not None and p.islands > 1:
        per_step = t.micro_batch_size * p.dp * p.islands
        _require(
            t.global_batch_size % per_step == 0,
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size * parallel.dp * parallel.islands = {per_step} (the global "
            "batch is split over the islands)",
        )


def _validate_model_components(m: ModelConfig) -> None:
    """What the config alone says about the filter. Its name, the plug-in files and what they
    declare are checked where plug-ins are loaded (yuanlfa.model.registry.check_model_config),
    by whoever builds or describes a model, before any expensive work."""
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


def _validate_cluster(cfg: Config) -> None:
    """The cluster's shape. Device names are the planner's to know
    (yuanlfa.planner.cluster.mixed_cluster checks them with the world size)."""
    c = cfg.cluster
    for name in ("inter_gbps",):
        _require(getattr(c, name) > 0, f"cluster.{name}: must be > 0, got {getattr(c, name)}")
    for name in ("inter_latency_us", "intra_latency_us"):
        value = getattr(c, name)
        _require(value >= 0, f"cluster.{name}: must be >= 0, got {value}")
    for i, g in enumerate(c.groups):
        key = f"cluster.groups[{i}]"
        _positive(key, g, "nodes", "devices_per_node", "memory_gib", "tflops", "intra_gbps")
        _require(bool(g.device.strip()), f"{key}.device: empty; name a preset, e.g. h100-80g")
    if c.groups and cfg.parallel.dp is not None:
        p = cfg.parallel
        world = p.tp * p.pp * p.cp * p.dp * p.islands
        _require(
            world == c.world_size,
            f"cluster: describes {_cluster_words(cfg)} = {c.world_size} devices but tp * pp * "
            f"cp * dp * islands = {world}; {_world_fix(cfg, c.world_size)}",
        )


def _validate_emulate(cfg: Config) -> None:
    e, p = cfg.emulate, cfg.parallel
    _require(
        e.pace == 0 or e.pace >= 1,
        f"emulate.pace: 0 (off) or >= 1 (at least the ranks per free core), got {e.pace}",
    )
    for name in ("speeds", "memory_gib"):
        values = getattr(e, name)
        _require(
            not values or p.pp > 1,
            f"emulate.{name}: emulates pipeline ranks (parallel.pp > 1); for one rank's memory "
            "use train.device_memory_gb",
        )
        _require(
            not values or len(values) == p.pp,
            f"emulate.{name}: one entry per pipeline rank (parallel.pp={p.pp}), got {len(values)}",
        )
    _require(
        all(0 < x <= 1 for x in e.speeds),
        f"emulate.speeds: each a fraction in (0, 1] of the fastest rank, got {list(e.speeds)}",
    )
    _require(
        all(x > 0 for x in e.memory_gib),
        f"emulate.memory_gib: each must be > 0 GiB, got {list(e.memory_gib)}",
    )
    _positive("emulate", e, "tflops")
    if e.pace:
        _require(p.pp > 1, "emulate.pace: paces pipeline ops; needs parallel.pp > 1")
        _require(
            p.tp == 1 and (p.dp or 1) == 1 and p.cp == 1 and p.islands == 1,
            "emulate.pace: emulates pipelines without tp, cp, dp or islands (their collectives "
            "would wait inside paced ops); set parallel.tp, cp, dp and islands to 1",
        )
        _require(
            cfg.train.device == "cpu",
            "emulate.pace: emulates devices on CPU cores; set train.device=cpu",
        )


def _cluster_words(cfg: Config) -> str:
    return " + ".join(f"{g.nodes} x {g.devices_per_node} {g.device}" for g in cfg.cluster.groups)


def _world_fix(cfg: Config, devices: int) -> str:
    """The smallest change that makes the layout fill ``devices`` devices."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    if devices % model_parallel == 0:
        return f"set parallel.dp={devices // model_parallel} (or leave it out)"
    return (
        f"tp * pp * cp = {model_parallel} does not divide {devices}: change parallel.pp or "
        "parallel.tp to a divisor of it, or the groups' nodes / devices_per_node"
    )


def _validate_split(split: str) -> None:
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(
            f"data.split: {split!r} must be comma-separated weights (train,valid,test) such "
            "as 98,1,1"
        ) from None
    _require(
        len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
        f"data.split: {split!r} must be up to three non-negative weights (train,valid,test)",
    )


def resolve(cfg: Config, world_size: int, tokenizer_vocab: int | None = None) -> Config:
    """Fill the derived fields (dp from the world size, the padded vocabulary) and re-validate."""
    p, m = cfg.parallel, cfg.model
    if world_size % p.islands != 0:
        raise ConfigError(
            f"parallel.islands: {p.islands} islands do not divide the world size {world_size}; "
            f"launch a multiple of {p.islands} processes or change parallel.islands"
        )
    total, world_size = world_size, world_size // p.islands  # world_size: one island's ranks
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"parallel: tp * pp * cp = {model_parallel} does not divide the world size "
            f"{world_size}; launch a multiple of {model_parallel} processes"
        )
    dp = world_size // model_parallel
    if cfg.cluster.groups and total != cfg.cluster.world_size:
        raise ConfigError(
            f"cluster: describes {_cluster_words(cfg)} = {cfg.cluster.world_size} devices but the "
            f"run has {total} processes; launch {cfg.cluster.world_size} or change the groups"
        )
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
