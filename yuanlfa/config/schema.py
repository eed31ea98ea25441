"""The configuration's shape: one frozen dataclass per section, and the error users see.

Each component receives only its own sub-config. YAML enters the program only through
:func:`yuanlfa.config.load_config`; everything after that works on typed, validated, immutable
objects. This package imports nothing else of the library and no torch, so reading a config is
cheap wherever it happens (the planner, the CLIs, the launcher).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    # two convolutions + RMSNorm, docs/yuan2_facts.md), lfa_no_norm, conv (one causal convolution of
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
    # Dropout on the attention probabilities in training (Yuan 2.0's --flash-attn-drop 0.1;
    # Megatron's --attention-dropout is the same thing on its unfused path). The mask of each
    # (step, sample, layer, head) is drawn from a seed of (train.seed, step, global sample index,
    # layer, global head), so every tp/pp/dp layout draws the same masks. 0: off.
    attention_dropout: float = 0.0
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
    # Islands: the outermost rank dimension. Each island is a full tp x pp x dp layout over fast
    # links (a node or a group of nodes); outer.algorithm says how islands are joined (none: the
    # dp reduction spans them, i.e. dp = islands * dp). parallel.dp counts ranks per island.
    islands: int = 1


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
    # No loss where the input is <eod>, i.e. on predicting the next document's first token
    # (Megatron's --eod-mask-loss); the <eod> label itself is learned.
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
    # Which layers full recompute covers (Megatron's --recompute-method): uniform, every layer
    # (recompute_num_layers must be 1: each layer its own checkpoint); block, only the first
    # recompute_num_layers layers of each pipeline stage (the others keep all activations).
    recompute_method: Literal["uniform", "block"] = "uniform"
    # Megatron's --recompute-num-layers (see recompute_method).
    recompute_num_layers: int = 1
    # The memory of one device in GiB for the fit check (yuanlfa-info, yuanlfa-train); None: read
    # from the GPU at train time, and no check in yuanlfa-info.
    device_memory_gb: float | None = None
    # Exit (after saving a checkpoint when checkpoint.dir is set) once the step count is a
    # multiple of this (0: never); like Megatron's --exit-interval, for jobs in time slots.
    exit_interval: int = 0
    # Peak dense throughput of one device in TFLOP/s, for the logged MFU. None: the datasheet
    # figure of a known GPU (planner/devices.py); no MFU on a CPU or an unknown GPU.
    peak_tflops: float | None = None

    def recompute_of(self, pp_rank: int) -> str:
        """Pipeline rank ``pp_rank``'s recompute mode: its entry of recompute_stages, else
        recompute (the one rule the planner and the parallel code both follow)."""
        return self.recompute_stages[pp_rank] if self.recompute_stages else self.recompute

    def recompute_per_rank(self, pp: int) -> tuple[str, ...]:
        return tuple(self.recompute_of(r) for r in range(pp))


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None
    interval: int = 0
    resume: bool = False
    keep_last: int = 2
    # Also keep every checkpoint whose step is a multiple of this (for later evaluation); None
    # keeps only the newest keep_last. Pruning happens only after a newer save is complete.
    keep_every: int | None = None
    # Write checkpoints in a background thread while training continues (the saving step only
    # copies its tensors to host memory). None (auto): on GPU; on CPU the writer would compete
    # with training for the cores. ("async" itself is a Python keyword.)
    async_save: bool | None = None
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
class NodeGroupConfig:
    """Nodes of one kind. Global ranks fill the groups in the order listed (group 0's nodes
    first), and within a group node by node, so the rank order decides which pipeline ranks
    run on which kind of device."""

    # A preset (h100-80g, h200, a100-80g, a100-40g, l40s-48g, ...; yuanlfa.planner.devices),
    # or any name with memory_gib and tflops both given.
    device: str = "h100-80g"
    nodes: int = 1
    devices_per_node: int = 8
    # Explicit figures, overriding the preset's: memory per device (GiB) and dense bf16 TFLOP/s.
    memory_gib: float | None = None
    tflops: float | None = None
    # Intra-node P2P GB/s per device (None: the preset's, NVLink or PCIe).
    intra_gbps: float | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """The devices a run lays out on; no groups: every rank on one (planner-chosen) device."""

    # Node groups of one device kind each, in rank order (empty: one planner-chosen device).
    groups: tuple[NodeGroupConfig, ...] = ()
    # What one device gets across nodes, GB/s (100 Gbit/s = 12.5 GB/s).
    inter_gbps: float = 12.5
    # Latency per message between nodes, microseconds.
    inter_latency_us: float = 10.0
    # Latency per message inside a node, microseconds.
    intra_latency_us: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))

    @property
    def world_size(self) -> int:
        return sum(g.nodes * g.devices_per_node for g in self.groups)


@dataclass(frozen=True)
class EmulateConfig:
    """A heterogeneous pipeline emulated on CPU cores (yuanlfa/parallel/pp/pacing.py): slow
    pipeline ranks by pacing their ops, small ones by a memory budget. Pipelines without tp or
    dp only (tp collectives inside an op would wait on paced peers)."""

    # Each pipeline op (a microbatch's forward or backward on a stage) lasts its thread CPU time
    # x pace / the rank's speed in wall time. At least the ranks per free core (4 ranks on 2
    # cores: 2 or more, 4 with other load), so that each rank needs its core only a fraction of
    # the time and sharing a core does not change the emulated times. 0: off.
    pace: float = 0.0
    # Per pipeline rank, its speed in (0, 1]. Empty: from the cluster section's TFLOP/s of each
    # rank's device relative to the fastest, else every rank at 1.
    speeds: tuple[float, ...] = ()
    # Per pipeline rank, the memory budget (GiB) the trainer enforces on its own accounting
    # (weights, gradients, optimizer state and the activations kept for backward), before the
    # first step by the planner's prediction and after each step by the measurement. Empty:
    # the cluster section's device memory when training on CPU with one, else no budget.
    memory_gib: tuple[float, ...] = ()
    # The sustained TFLOP/s of a full-speed rank (of the cluster's fastest device), for the plan
    # and the logged predicted_busy_s; None: each device's peak x 0.45. A paced CPU rank
    # sustains far less: fit it on one run (benchmarks/heterogeneous.py's fitted_flops_per_s).
    tflops: float | None = None

    def __post_init__(self) -> None:
        for name in ("speeds", "memory_gib"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class OuterConfig:
    """How islands (parallel.islands) are joined: the outer loop of DiLoCo-style training
    (docs/islands.md)."""

    # none: islands are plain data-parallel replicas (the gradient reduction spans them);
    # diloco: each island trains alone and every sync_every steps the islands average their
    # parameter change and apply it with an outer Nesterov SGD; streaming_diloco: the same per
    # fragment of the layers, fragments staggered over the sync_every steps, each exchange
    # overlapped with fragment_delay inner steps.
    algorithm: Literal["none", "diloco", "streaming_diloco"] = "none"
    # H: inner steps between two outer steps (of the same fragment).
    sync_every: int = 100
    # A synchronous warm start: the first warm_start_steps steps reduce the gradients across
    # the islands every step (as algorithm none: the islands are one data-parallel run), then
    # the outer loop starts from the parameters of that step (its first outer step
    # sync_every steps later). 0: the islands train apart from the first step.
    warm_start_steps: int = 0
    # The outer optimizer: SGD on the averaged pseudo-gradient (DiLoCo's 0.7, 0.9, Nesterov).
    lr: float = 0.7
    # The outer SGD's momentum (torch.optim.SGD semantics; 0: none).
    momentum: float = 0.9
    # Nesterov momentum for the outer SGD (used when momentum > 0).
    nesterov: bool = True
    # streaming_diloco: contiguous layer fragments (at most model.num_layers, dividing
    # sync_every); fragment p syncs every sync_every steps, starting at p * sync_every / fragments.
    fragments: int | None = None
    # streaming_diloco: inner steps between the start of a fragment's exchange and its outer
    # step (< sync_every; with per-island launches at most sync_every / fragments); the
    # exchange overlaps those steps' compute.
    fragment_delay: int = 0
    # streaming_diloco: weight of the fragment's local parameters when the outer result is
    # merged in after a delayed exchange (0: the outer result replaces them; torchft's
    # fragment_update_alpha).
    fragment_mix: float = 0.0
    # streaming_diloco, after a delayed exchange: "mix" = lerp(outer result, local parameters,
    # fragment_mix) (torchft's merge); "carry" = the outer result plus the fragment's local
    # change since the exchange started (no local step is dropped or counted twice; with
    # fragment_delay 0 both are DiLoCo).
    fragment_merge: Literal["mix", "carry"] = "mix"
    # diloco: at each outer step also average the inner AdamW moments over the islands:
    # "first" (exp_avg), "both" (exp_avg and exp_avg_sq), "none". Each adds the parameters'
    # fp32 bytes to the exchange (first: 2x, both: 3x the pseudo-gradient's link bytes); islands
    # then restart every H steps from the same optimizer state, not only the same parameters.
    average_moments: Literal["none", "first", "both"] = "none"
    # Send pseudo-gradients as bf16 (half the link bytes; the sum over the islands is in bf16,
    # the outer step in fp32).
    quantize: bool = False
    # Per-island launches only (yuanlfa-train --island I, torchft): "auto" = the first island up
    # starts a lighthouse process, which publishes its address in checkpoint.dir and outlives
    # the loss of any island ($TORCHFT_LIGHTHOUSE overrides); "HOST:PORT" = a running
    # torchft_lighthouse (multi-node).
    lighthouse: str = "auto"
    # Seconds to wait for the lighthouse, a quorum or a peer before a one-line error; more than
    # sync_every steps take (a restarted island waits for the live islands' next outer step).
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
