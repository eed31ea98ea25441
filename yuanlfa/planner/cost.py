"""Cost model per pipeline rank: memory (states + activations) and time (compute + links).

Memory of a pipeline rank = weights + gradients + optimizer states of its layers and extras
(:mod:`.memory`), + activations at the schedule's peak (each in-flight microbatch's bytes of the
stages it runs, :mod:`.activations`), + the largest transient workspace (one layer's recompute,
the loss's logits block and fp32 weight-gradient accumulator on the last stage).

Time per microbatch of a stage = FLOPs / sustained FLOP/s (device peak * mfu, or a calibrated
``flops_per_s``) for forward (projections, LFA, MLP and the causal attention term growing with
seq; the head 2hV per token) and backward (2x the forward; the block-wise loss recomputes its
logits, 3x; recompute adds one layer forward (full) or the attention core (selective)), + the
tensor-parallel collectives of :mod:`.comm` (ring formulas of :mod:`.links` on the tp group's
link), + the stage's P2P sends ([s / tp under SP, b, h] forward to the next stage and its
gradient back, alpha + bytes / bandwidth on that boundary's link). A step is the schedule
simulated with those per-stage times (ops in torch's order, each waiting for its dependency on
the neighbouring stage) plus, not overlapped, the data-parallel gradient reduce-scatter and
parameter all-gather (all-reduce without the distributed optimizer), bucketed as the trainer
buckets them, and the tied embedding's gradient sum between the first and last stage.

Links come from a :class:`~.topology.Cluster` (intra- or inter-node per group, from the rank
order) or, without one, from ``p2p_gbps`` / ``tp_gbps`` / ``dp_gbps`` and one ``latency_s``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import cached_property

from yuanlfa.config import Config, ConfigError
from yuanlfa.layout import PipelineLayout
from yuanlfa.layout.schedules import Op, ScheduleSpec, rank_ops, schedule_spec
from yuanlfa.planner import comm
from yuanlfa.planner.activations import (
    ActivationSpec,
    activation_spec,
    layer_activation_bytes,
    loss_workspace_bytes,
    microbatch_activations,
    num_microbatches,
    outstanding_profile,
    recompute_workspace_bytes,
)
from yuanlfa.planner.cluster import MixedCluster, pipeline_devices
from yuanlfa.planner.devices import DEFAULT_MFU, PRESETS, DevicePreset
from yuanlfa.planner.flops import flops_per_token
from yuanlfa.planner.links import Link
from yuanlfa.planner.memory import StateBytes, layer_params, stage_extra_params, state_bytes
from yuanlfa.planner.params import param_counts
from yuanlfa.planner.topology import Cluster, LinkPlan, link_plan, uniform_links


@dataclass(frozen=True)
class StageTime:
    """Seconds per microbatch of one stage: compute, and the links each pass waits on."""

    forward_s: float
    backward_s: float
    weight_grad_s: float  # of backward_s: the weight-gradient GEMMs (zero bubble's W op)
    comm_s: float  # P2P and tensor-parallel collectives, forward + backward
    # Of comm_s: what the forward pass waits on (None: half of it).
    forward_comm_s: float | None = None

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.comm_s

    @property
    def comm_split(self) -> tuple[float, float]:
        """(forward, backward) shares of comm_s."""
        fwd = self.comm_s / 2 if self.forward_comm_s is None else self.forward_comm_s
        return fwd, self.comm_s - fwd


@dataclass(frozen=True)
class RankCost:
    """One pipeline rank (one tensor-parallel rank of it); times are per microbatch."""

    rank: int
    stages: tuple[int, ...]
    blocks: tuple[int, ...]  # layers of each of its stages
    params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # at the schedule's peak
    workspace_bytes: int  # transient: recompute, loss blocks
    in_flight: int  # (microbatch, stage) activations held at that peak
    forward_s: float
    backward_s: float
    comm_s: float
    dp_comm_s: float  # once per step: the data-parallel reduction
    sync_comm_s: float = 0.0  # once per step: tied embedding and replicated-weight gradient sums

    @property
    def layers(self) -> int:
        return sum(self.blocks)

    @property
    def memory_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.workspace_bytes
        )

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_s + self.comm_s


@dataclass(frozen=True)
class TimelineOp:
    rank: int
    kind: str  # F, B or W
    stage: int
    microbatch: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class PlanCost:
    blocks: tuple[int, ...]
    pp: int
    virtual_stages: int
    ranks: tuple[RankCost, ...]
    num_microbatches: int
    pipeline_s: float  # the simulated schedule over all microbatches
    memory_limit_bytes: int | None
    timeline: tuple[TimelineOp, ...] = field(default=(), repr=False)
    # Per pipeline rank on a heterogeneous cluster (its own device's memory); empty: one limit.
    rank_limits: tuple[int | None, ...] = ()

    @property
    def memory_max_bytes(self) -> int:
        return max(r.memory_bytes for r in self.ranks)

    @property
    def memory_min_bytes(self) -> int:
        return min(r.memory_bytes for r in self.ranks)

    @property
    def memory_max_min_ratio(self) -> float:
        return self.memory_max_bytes / max(self.memory_min_bytes, 1)

    @property
    def time_max_s(self) -> float:
        return max(r.time_s for r in self.ranks)

    @property
    def dp_comm_s(self) -> float:
        return max(r.dp_comm_s for r in self.ranks)

    @property
    def step_comm_s(self) -> float:
        """What follows the pipeline, on the slowest rank: dp reduction and gradient sums."""
        return max(r.dp_comm_s + r.sync_comm_s for r in self.ranks)

    @property
    def step_time_s(self) -> float:
        return self.pipeline_s + self.step_comm_s

    @property
    def bubble_fraction(self) -> float:
        """Idle time of the busiest rank over its busy time, (pp - 1) / (v * m) for even stages
        (Megatron's definition)."""
        busy = self.num_microbatches * self.time_max_s
        return max(self.pipeline_s - busy, 0.0) / busy

    def limit_of(self, rank: int) -> int | None:
        return self.rank_limits[rank] if self.rank_limits else self.memory_limit_bytes

    @property
    def fits(self) -> bool:
        return all(
            self.limit_of(r.rank) is None or r.memory_bytes <= self.limit_of(r.rank)
            for r in self.ranks
        )


@dataclass(frozen=True)
class CostModel:
    """The per-layer and per-stage terms of one config on one device.

    Build it with :func:`cost_model`; :meth:`evaluate` costs a block list, and the balancer uses
    :meth:`rank_memory` / :meth:`rank_time` on candidate splits.
    """

    cfg: Config
    device: DevicePreset
    specs: tuple[ActivationSpec, ...]  # per pipeline rank (its recompute mode)
    state: StateBytes
    mfu: float
    flops_per_s: float  # sustained: device peak * mfu, or calibrated
    links: LinkPlan
    num_microbatches: int
    memory_limit_bytes: int | None  # with rank_limits: the largest of them
    # Heterogeneous clusters (:mod:`.cluster`): per pipeline rank its device, sustained FLOP/s
    # and memory limit. Empty: every rank on ``device`` at ``flops_per_s``.
    rank_devices: tuple[DevicePreset, ...] = ()
    rank_flops: tuple[float, ...] = ()
    rank_limits: tuple[int | None, ...] = ()

    @property
    def backend(self) -> str:
        """The process group's backend (gloo on a host, nccl on GPUs): what its collectives send
        differs (:mod:`.comm`)."""
        return comm.backend_of(self.specs[0].fused_norm)

    def device_of(self, rank: int) -> DevicePreset:
        return self.rank_devices[rank] if self.rank_devices else self.device

    def flops_of(self, rank: int) -> float:
        return self.rank_flops[rank] if self.rank_flops else self.flops_per_s

    def limit_of(self, rank: int) -> int | None:
        return self.rank_limits[rank] if self.rank_limits else self.memory_limit_bytes

    @cached_property
    def held(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Per rank: microbatches held per local stage at the schedule's candidate peaks
        (computed on first use: time estimates alone do not need the schedule's order)."""
        p = self.cfg.parallel
        return schedule_held(p.schedule, p.pp, self.num_microbatches, p.virtual_stages)

    @cached_property
    def schedule(self) -> ScheduleSpec:
        return schedule_spec(self.cfg.parallel.schedule)

    def rank_of(self, stage: int) -> int:
        """The pipeline rank holding ``stage`` (the schedule's placement)."""
        return self.schedule.rank_of_stage(self.pp, self.virtual_stages, stage)

    @cached_property
    def _memo(self) -> dict:
        """Per-layer and per-stage terms, computed once: the balancer and the advisor ask for
        them for every layer count of every stage (the model is immutable)."""
        return {}

    def _cached(self, key: tuple, compute):
        memo = self._memo
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pp

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tp

    @property
    def dp(self) -> int:
        return self.cfg.parallel.dp or 1

    @property
    def p2p_gbps(self) -> float:
        """The slowest pipeline boundary's bandwidth."""
        return min(link.gbps for link in self.links.p2p)

    @property
    def tp_gbps(self) -> float:
        return self.links.tp.gbps

    @property
    def dp_gbps(self) -> float:
        return self.links.dp.gbps

    @property
    def spec(self) -> ActivationSpec:
        """The settings every rank shares (dtype, kernels); recompute is per rank."""
        return self.specs[0]

    @property
    def virtual_stages(self) -> int:
        return self.cfg.parallel.virtual_stages

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def num_layers(self) -> int:
        return self.cfg.model.num_layers

    # Memory

    def stage_params(self, stage: int, layers: int) -> int:
        first, last = stage == 0, stage == self.num_stages - 1
        per_layer = self._cached(("layer_params",), lambda: layer_params(self.cfg))
        extra = self._cached(
            ("extra_params", stage),
            lambda: stage_extra_params(self.cfg, first, last, self.num_stages),
        )
        return layers * per_layer + extra

    def microbatch_bytes(self, stage: int, layers: int) -> int:
        """Activations one microbatch leaves on ``stage`` when it holds ``layers`` layers."""
        spec = self.specs[self.rank_of(stage)]
        # Linear in the layers beyond the first (microbatch_activations), except under block
        # recompute, where the first recompute_layers layers save less than the rest.
        block = spec.recompute == "full" and spec.recompute_layers is not None
        if layers > 1 and not block:
            rank = self.rank_of(stage)
            per_layer = self._cached(
                ("layer_bytes", rank),
                lambda: layer_activation_bytes(self.cfg.model, self.specs[rank]),
            )
            return self.microbatch_bytes(stage, 1) + (layers - 1) * per_layer
        first, last = stage == 0, stage == self.num_stages - 1
        return self._cached(
            ("microbatch_bytes", stage, layers),
            lambda: (
                microbatch_activations(
                    self.cfg.model, spec, layers, first, last, self.num_stages
                ).total
            ),
        )

    def recompute_workspace_bytes(self, rank: int) -> int:
        return recompute_workspace_bytes(self.cfg.model, self.specs[rank])

    def loss_workspace_bytes(self) -> int:
        return loss_workspace_bytes(self.cfg.model, self.spec)

    def workspace_bytes(self, stages: tuple[int, ...], blocks: tuple[int, ...]) -> int:
        """The largest transient buffer: one layer's recompute (if the rank holds a layer), the
        loss's blocks and weight-gradient accumulator (if it holds the last stage)."""
        recompute = self.recompute_workspace_bytes(self.rank_of(stages[0])) if sum(blocks) else 0
        loss = self.loss_workspace_bytes() if self.num_stages - 1 in stages else 0
        return max(recompute, loss)

    def rank_ops(self, rank: int) -> list[Op]:
        p = self.cfg.parallel
        return rank_ops(p.schedule, self.pp, rank, self.num_microbatches, self.virtual_stages)

    def rank_activation_bytes(self, rank: int, blocks: tuple[int, ...]) -> tuple[int, int]:
        """(peak activation bytes, microbatches held then) of ``rank`` holding ``blocks``."""
        per_mb = [self.microbatch_bytes(s, b) for s, b in zip(self.stages_of(rank), blocks)]
        best, count = 0, 0
        for held in self.held[rank]:
            total = sum(c * b for c, b in zip(held, per_mb))
            if total > best or (total == best and sum(held) > count):
                best, count = total, sum(held)
        return best, count

    def rank_memory(self, rank: int, blocks: tuple[int, ...]) -> int:
        stages = self.stages_of(rank)
        params = sum(self.stage_params(s, b) for s, b in zip(stages, blocks))
        static = sum(self.state.of(params))
        activations, _ = self.rank_activation_bytes(rank, blocks)
        return static + activations + self.workspace_bytes(stages, blocks)

    # Time

    def _seconds(self, flops: float, rank: int) -> float:
        return flops / self.flops_of(rank)

    def layer_time(self, rank: int = 0) -> StageTime:
        """One layer on pipeline rank ``rank`` (its recompute mode)."""
        return self._cached(("layer_time", rank), lambda: self._layer_time(rank))

    def _layer_time(self, rank: int) -> StageTime:
        m, p, spec = self.cfg.model, self.cfg.parallel, self.specs[rank]
        terms = flops_per_token(m, spec.seq_length)
        L, tp, T = m.num_layers, p.tp, spec.tokens
        # The LFA is replicated over tp (whole sequence) unless sequence parallelism shards it.
        lfa_div = tp if p.sequence_parallel else 1
        sharded = (terms["projections"] + terms["mlp"]) / L / tp
        attention = terms["attention"] / L / tp
        lfa = terms["lfa"] / L / lfa_div
        forward = self._seconds((sharded + attention + lfa) * T, rank)
        recompute = {"none": 0.0, "selective": self._seconds(attention * T, rank), "full": forward}
        weight_grad = self._seconds((sharded + lfa) * T, rank)  # dW GEMMs mirror the forward GEMMs
        backward = 2 * forward + recompute[spec.recompute]
        fwd_comm, bwd_comm = comm.layer_tp_s(m, spec, p.sequence_parallel, self.links.tp)
        if spec.recompute == "full":
            bwd_comm += fwd_comm  # the recomputed forward runs its collectives again
        return StageTime(forward, backward, weight_grad, fwd_comm + bwd_comm, fwd_comm)

    def stage_time(self, stage: int, layers: int) -> StageTime:
        """``stage`` holding ``layers`` layers: that many layers plus its fixed parts."""
        layer = self.layer_time(self.rank_of(stage))
        fixed = self._cached(("stage_fixed", stage), lambda: self._stage_fixed(stage))
        fwd_comm = layers * layer.comm_split[0] + fixed.comm_split[0]
        return StageTime(
            layers * layer.forward_s + fixed.forward_s,
            layers * layer.backward_s + fixed.backward_s,
            layers * layer.weight_grad_s + fixed.weight_grad_s,
            layers * layer.comm_s + fixed.comm_s,
            fwd_comm,
        )

    def _stage_fixed(self, stage: int) -> StageTime:
        """What a stage costs besides its layers: the embedding, the head and loss, its links."""
        m, p, spec = self.cfg.model, self.cfg.parallel, self.spec
        first, last = stage == 0, stage == self.num_stages - 1
        forward = backward = weight_grad = fwd_comm = bwd_comm = 0.0
        if first:
            fwd_comm += comm.embedding_tp_s(m, spec, p.sequence_parallel, self.links.tp)
        if last:
            flops = 2.0 * m.hidden_size * m.vocab_size / p.tp
            head = self._seconds(flops, self.rank_of(stage)) * spec.tokens
            forward += head
            backward += 3 * head  # the block-wise loss recomputes each block's logits
            weight_grad += head
            f, b = comm.head_tp_s(m, spec, p.sequence_parallel, self.links.tp)
            fwd_comm, bwd_comm = fwd_comm + f, bwd_comm + b
        boundary = spec.dtype_bytes * m.hidden_size * spec.shard_tokens
        if not last:  # the activation to the next stage
            fwd_comm += self._boundary_s(stage, boundary)
        if not first:  # the input's gradient back to the previous stage
            bwd_comm += self._boundary_s(stage - 1, boundary)
        return StageTime(forward, backward, weight_grad, fwd_comm + bwd_comm, fwd_comm)

    def _boundary_s(self, stage: int, nbytes: int) -> float:
        """Sending ``nbytes`` from ``stage`` to ``stage + 1``: nothing where one rank holds both
        (the turn of a V-shaped placement); else over the link between their ranks."""
        a, b = self.rank_of(stage), self.rank_of(stage + 1)
        return 0.0 if a == b else self.links.between(a, b).transfer_s(nbytes)

    def rank_stage_time(self, rank: int, layers_per_stage: tuple[int, ...]) -> StageTime:
        """The rank's stages together. Computed from the layer count and the stages' fixed
        parts only, so every spread of the same layers gives bit-identical times."""
        n, layer = sum(layers_per_stage), self.layer_time(rank)
        fixed = [self.stage_time(s, 0) for s in self.stages_of(rank)]
        return StageTime(
            n * layer.forward_s + sum(t.forward_s for t in fixed),
            n * layer.backward_s + sum(t.backward_s for t in fixed),
            n * layer.weight_grad_s + sum(t.weight_grad_s for t in fixed),
            n * layer.comm_s + sum(t.comm_s for t in fixed),
            n * layer.comm_split[0] + sum(t.comm_split[0] for t in fixed),
        )

    def rank_time(self, rank: int, layers_per_stage: tuple[int, ...]) -> float:
        return self.rank_stage_time(rank, layers_per_stage).total_s

    def dp_comm_s(self, params: int) -> float:
        """Once per step: the data-parallel gradient reduction (and parameter all-gather) of a
        rank holding ``params`` parameters."""
        p = self.cfg.parallel
        return comm.dp_step_s(
            params, self.dp, self.state, self.cfg.optim.distributed, p.grad_bucket_size,
            self.links.dp, self.backend,
        )  # fmt: skip

    def sync_comm_s(self, rank: int, blocks: tuple[int, ...]) -> float:
        """Once per step on pipeline rank ``rank`` holding ``blocks``: the tied embedding's
        gradient sum between the first and last stage, and under sequence parallelism the tp
        sum of the replicated weights' (norms, LFA) gradients."""
        cfg, p = self.cfg, self.cfg.parallel
        stages = self.stages_of(rank)
        total = 0.0
        # Only where the two ends are on different ranks (a V-shaped placement puts both on rank
        # 0, whose one embedding collects both gradients).
        holds_one_end = (0 in stages) != (self.num_stages - 1 in stages)
        if self.num_stages > 1 and cfg.model.tie_embeddings and holds_one_end:
            total += comm.tied_embedding_s(
                param_counts(cfg.model).embedding // p.tp, self.dp, self.state,
                cfg.optim.distributed, self.links.embed,
            )  # fmt: skip
        if p.sequence_parallel:
            replicated = param_counts(cfg.model).per_layer_replicated * sum(blocks)
            total += comm.replicated_grads_s(replicated, p.tp, self.state, self.links.tp)
        return total

    # Whole plans

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages pipeline rank ``rank`` runs (the schedule's placement), in stage order."""
        return self.schedule.stages_of_rank(self.pp, self.virtual_stages, rank)

    def check_blocks(self, blocks: tuple[int, ...]) -> None:
        if len(blocks) != self.num_stages or sum(blocks) != self.num_layers or min(blocks) < 0:
            raise ConfigError(
                f"pipeline blocks {list(blocks)}: need {self.num_stages} non-negative entries "
                f"summing to model.num_layers={self.num_layers}"
            )

    def rank_cost(self, rank: int, blocks: tuple[int, ...]) -> RankCost:
        stages = self.stages_of(rank)
        mine = tuple(blocks[s] for s in stages)
        params = sum(self.stage_params(s, b) for s, b in zip(stages, mine))
        weights, grads, optimizer = self.state.of(params)
        activations, in_flight = self.rank_activation_bytes(rank, mine)
        times = self.rank_stage_time(rank, mine)
        return RankCost(
            rank=rank,
            stages=stages,
            blocks=mine,
            params=params,
            weights_bytes=weights,
            grads_bytes=grads,
            optimizer_bytes=optimizer,
            activation_bytes=activations,
            workspace_bytes=self.workspace_bytes(stages, mine),
            in_flight=in_flight,
            forward_s=times.forward_s,
            backward_s=times.backward_s,
            comm_s=times.comm_s,
            dp_comm_s=self.dp_comm_s(params),
            sync_comm_s=self.sync_comm_s(rank, mine),
        )

    def evaluate(self, blocks: tuple[int, ...] | PipelineLayout) -> PlanCost:
        if isinstance(blocks, PipelineLayout):
            blocks = blocks.blocks
        blocks = tuple(int(b) for b in blocks)
        self.check_blocks(blocks)
        ranks = tuple(self.rank_cost(r, blocks) for r in range(self.pp))
        timeline = simulate(self, blocks)
        return PlanCost(
            blocks=blocks,
            pp=self.pp,
            virtual_stages=self.virtual_stages,
            ranks=ranks,
            num_microbatches=self.num_microbatches,
            pipeline_s=max(op.end_s for op in timeline),
            memory_limit_bytes=self.memory_limit_bytes,
            timeline=timeline,
            rank_limits=self.rank_limits,
        )


def cost_model(
    cfg: Config,
    device: DevicePreset | None = None,
    *,
    mfu: float = DEFAULT_MFU,
    flops_per_s: float | None = None,
    p2p_gbps: float | None = None,
    tp_gbps: float | None = None,
    dp_gbps: float | None = None,
    latency_s: float = 0.0,
    cluster: Cluster | None = None,
    links: LinkPlan | None = None,
    memory_limit_bytes: int | None = None,
    gpu: bool | None = None,
    devices: tuple[DevicePreset, ...] | None = None,
    speeds: tuple[float, ...] | None = None,
) -> CostModel:
    """The cost model of a resolved ``cfg`` (vocab and dp known; dp None counts as 1).

    ``device`` None plans without a memory limit on a nominal device (H100-SXM on a GPU, "cpu"
    otherwise), which is enough to compare splits by time. Compute runs at ``flops_per_s``
    (a calibrated sustained rate) or the device's peak times ``mfu``.

    Links: a ``cluster`` (nodes, devices per node, intra- and inter-node links) picks each
    group's link from the rank order (:func:`~.topology.link_plan`); ``links`` gives them
    directly; otherwise P2P and tp run at ``p2p_gbps`` / ``tp_gbps`` (default: the device's
    intra-node bandwidth) and dp at ``dp_gbps`` (default: the P2P one), each message paying
    ``latency_s``. ``memory_limit_bytes`` defaults to the device's memory when a device is
    given. ``gpu`` (precision ``auto``, fused kernels) defaults to the device kind, else to
    train.device.

    Heterogeneous: ``devices`` gives each pipeline rank its device (a
    :class:`~.cluster.MixedCluster` gives them from its groups and the rank order): a rank
    computes at its device's peak * mfu (with a calibrated ``flops_per_s``, that of the fastest
    device, the others scaled by their peaks) and holds at most its device's memory (or
    ``memory_limit_bytes`` when smaller). ``speeds`` (per pipeline rank, 1 = full speed)
    slow ranks down further: an emulated slow rank on a CPU.
    """
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size: resolve the config (yuanlfa.config.resolve) first")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu: the sustained fraction of peak must be in (0, 1], got {mfu}")
    if flops_per_s is not None and not flops_per_s > 0:
        raise ConfigError(f"flops_per_s: the sustained FLOP/s must be > 0, got {flops_per_s}")
    limit = memory_limit_bytes
    if device is not None:
        gpu = device.gpu if gpu is None else gpu
        limit = device.memory_bytes if limit is None else limit
    specs = tuple(activation_spec(cfg, gpu, r) for r in range(cfg.parallel.pp))
    gpu = specs[0].fused_norm
    if device is None:
        device = PRESETS["h100-sxm" if gpu else "cpu"]
    for name, value in (("p2p_gbps", p2p_gbps), ("tp_gbps", tp_gbps), ("dp_gbps", dp_gbps)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: link bandwidth must be > 0 GB/s, got {value}")
        if value is not None and (cluster is not None or links is not None):
            raise ConfigError(f"{name}: give per-dimension links or a cluster, not both")
    p = cfg.parallel
    if devices is None and isinstance(cluster, MixedCluster):
        devices = pipeline_devices(cluster, p.tp, p.pp, p.dp or 1, p.rank_order)
    if links is None and cluster is not None:
        links = link_plan(cluster, p.tp, p.pp, p.dp or 1, p.rank_order)
    elif links is None:
        p2p = p2p_gbps if p2p_gbps is not None else device.link_gbps
        links = uniform_links(
            Link(p2p, latency_s),
            Link(tp_gbps if tp_gbps is not None else device.link_gbps, latency_s),
            Link(dp_gbps if dp_gbps is not None else p2p, latency_s),
            p.pp,
        )
    m = num_microbatches(cfg)
    if m < 1:
        raise ConfigError(
            "train.global_batch_size: smaller than micro_batch_size * dp; no microbatch to run"
        )
    if p.pp > 1:
        schedule_spec(p.schedule).check(p.pp, p.virtual_stages, m)
    base = flops_per_s if flops_per_s is not None else device.peak_flops * mfu
    rank_flops: tuple[float, ...] = ()
    rank_limits: tuple[int | None, ...] = ()
    if devices is not None:
        devices = tuple(devices)
        if len(devices) != p.pp:
            raise ConfigError(f"devices: {len(devices)} given for parallel.pp={p.pp} ranks")
        fastest = max(d.peak_flops for d in devices)
        rank_flops = tuple(
            (flops_per_s * d.peak_flops / fastest) if flops_per_s is not None else
            d.peak_flops * mfu
            for d in devices
        )  # fmt: skip
        rank_limits = tuple(
            d.memory_bytes
            if memory_limit_bytes is None
            else min(d.memory_bytes, memory_limit_bytes)
            for d in devices
        )
        limit = max(rank_limits)
        base = max(rank_flops)
        device = max(devices, key=lambda d: d.peak_flops)
    if speeds is not None:
        speeds = tuple(speeds)
        if len(speeds) != p.pp or not all(0 < x <= 1 for x in speeds):
            raise ConfigError(
                f"speeds: need parallel.pp={p.pp} factors in (0, 1], got {list(speeds)}"
            )
        rank_flops = tuple(f * x for f, x in zip(rank_flops or (base,) * p.pp, speeds))
    return CostModel(
        cfg=cfg,
        device=device,
        specs=specs,
        state=state_bytes(cfg, p.dp or 1, gpu),
        mfu=mfu,
        flops_per_s=base,
        links=links,
        num_microbatches=m,
        memory_limit_bytes=limit,
        rank_devices=devices or (),
        rank_flops=rank_flops,
        rank_limits=rank_limits,
    )


@functools.lru_cache(maxsize=256)
def schedule_held(
    schedule: str, pp: int, num_microbatches: int, virtual_stages: int
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """:func:`held_counts` of every pipeline rank of a schedule (shared by all cost models of
    the same schedule shape)."""
    return tuple(
        held_counts(rank_ops(schedule, pp, r, num_microbatches, virtual_stages), pp, virtual_stages)
        for r in range(pp)
    )


def held_counts(ops: list[Op], pp: int, virtual_stages: int) -> tuple[tuple[int, ...], ...]:
    """Microbatches held per local stage (k-th entry: the rank's k-th stage, s // pp = k under
    both looped and V-shaped placement) after each forward, keeping only vectors no other one
    dominates (the only candidate peaks)."""
    vectors = set()
    for held in outstanding_profile(ops):
        vec = [0] * virtual_stages
        for s, c in held.items():
            vec[s // pp] = c
        vectors.add(tuple(vec))
    keep: list[tuple[int, ...]] = []
    for v in sorted(vectors, reverse=True):  # a dominating vector sorts before what it dominates
        if not any(all(a >= b for a, b in zip(w, v)) for w in keep):
            keep.append(v)
    return tuple(keep)


def simulate(model: CostModel, blocks: tuple[int, ...]) -> tuple[TimelineOp, ...]:
    """Run every rank's ops in schedule order; an op starts when its rank is free and its input
    exists: a forward needs the previous stage's forward of that microbatch, a backward the next
    stage's input gradient (full backward B or input-only I; the last stage its own forward), a
    weight-gradient op W its I."""
    times = [model.stage_time(s, b) for s, b in enumerate(blocks)]
    last = len(blocks) - 1

    # A forward runs its collectives and sends the activation; a backward runs its collectives
    # and sends the input gradient.
    duration: dict[tuple[str, int], float] = {}
    for stage, t in enumerate(times):
        fwd_comm, bwd_comm = t.comm_split
        duration["F", stage] = t.forward_s + fwd_comm
        duration["W", stage] = t.weight_grad_s
        duration["B", stage] = t.backward_s + bwd_comm
        duration["I", stage] = t.backward_s - t.weight_grad_s + bwd_comm

    def done_key(op: Op) -> tuple[str, int, int]:
        # B and I both deliver the input gradient the previous stage waits for.
        return ("B" if op.kind == "I" else op.kind, op.stage, op.microbatch)

    def dependency(op: Op) -> tuple[str, int, int] | None:
        if op.kind == "F":
            return ("F", op.stage - 1, op.microbatch) if op.stage > 0 else None
        if op.kind in ("B", "I"):
            if op.stage == last:
                return ("F", op.stage, op.microbatch)
            return ("B", op.stage + 1, op.microbatch)
        return ("B", op.stage, op.microbatch)

    queues = [[(op, dependency(op)) for op in model.rank_ops(r)] for r in range(model.pp)]
    pos = [0] * model.pp
    free = [0.0] * model.pp
    done: dict[tuple[str, int, int], float] = {}
    out: list[TimelineOp] = []
    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r in range(model.pp):
            queue, i, now = queues[r], pos[r], free[r]
            while i < len(queue):
                op, dep = queue[i]
                if dep is not None:
                    ready = done.get(dep)
                    if ready is None:
                        break
                    now = max(now, ready)
                end = now + duration[op.kind, op.stage]
                done[done_key(op)] = end
                out.append(TimelineOp(r, op.kind, op.stage, op.microbatch, now, end))
                now = end
                i += 1
            if i > pos[r]:
                remaining -= i - pos[r]
                progressed = True
            pos[r], free[r] = i, now
        if not progressed:
            raise RuntimeError("pipeline schedule simulation deadlocked (schedule order bug)")
    return tuple(out)
