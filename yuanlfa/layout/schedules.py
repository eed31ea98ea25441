"""Pipeline schedules as specs: how many stages a rank runs, which rank holds a stage, and the
order in which each rank runs its forward and backward passes.

One :class:`ScheduleSpec` per ``parallel.schedule``. The runner takes the torch class and the
stage placement from it; the planner takes the operation order (:func:`rank_ops`) to count the
microbatches each rank holds and to simulate the step. The orders are generated exactly as
torch.distributed.pipelining (2.13) generates them (``_calculate_single_rank_operations`` of each
schedule class, and the loops of ``ScheduleGPipe``/``Schedule1F1B``), idle slots left out;
tests/parallel/test_schedule_specs.py compares them with torch's.

Operations: ``F`` forward; ``B`` full backward (input and weight gradients); under the
zero-bubble schedules ``I`` (input gradients only) followed later by ``W`` (weight gradients)
of the same stage and microbatch.

Placement: looped (stage s on pipeline rank s % pp; Megatron's and torch's interleaving) or
V-shaped (rank r holds stages r and 2 * pp - 1 - r, so the first and the last stage, and with
them a tied embedding, are on rank 0, and stages pp - 1 and pp meet on the last rank).

Torch-free: imports only :mod:`yuanlfa.config` and the placement arithmetic of
:mod:`yuanlfa.layout.ranks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from yuanlfa.config import ConfigError
from yuanlfa.layout.ranks import Placement, rank_of_stage, stages_of_rank

OpKind = Literal["F", "B", "I", "W"]


@dataclass(frozen=True)
class Op:
    """One scheduled computation of one microbatch on one stage."""

    kind: OpKind
    stage: int
    microbatch: int


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    torch_class: str  # in torch.distributed.pipelining
    # Stages per rank: 1, 2 (V-shaped), or None for parallel.virtual_stages (any v >= 1).
    stages_per_rank: int | None
    placement: Placement
    # Whether torch calls it with one stage (PipelineScheduleSingle) or a list of stages.
    single_stage: bool
    # torch requires microbatches >= this many times the number of stages (DualPipeV).
    min_microbatches_per_stage: int = 0

    @property
    def ends_on_one_rank(self) -> bool:
        """The first and the last stage (and so a tied embedding) share pipeline rank 0."""
        return self.placement == "v"

    def stages_of_rank(self, pp: int, virtual_stages: int, rank: int) -> list[int]:
        return stages_of_rank(rank, pp, virtual_stages, self.placement)

    def rank_of_stage(self, pp: int, virtual_stages: int, stage: int) -> int:
        return rank_of_stage(stage, pp, virtual_stages, self.placement)

    def check(self, pp: int, virtual_stages: int, num_microbatches: int | None = None) -> None:
        """Raise ConfigError (one line) where torch would refuse, or misrun, this shape."""
        v = virtual_stages
        if self.stages_per_rank is not None and v != self.stages_per_rank:
            if self.stages_per_rank == 1:
                raise ConfigError(
                    f"parallel.schedule: {self.name} runs one stage per rank but "
                    f"parallel.virtual_stages = {v}; use interleaved_1f1b or zero_bubble, or set "
                    "virtual_stages=1"
                )
            raise ConfigError(
                f"parallel.schedule: {self.name} runs {self.stages_per_rank} stages per rank "
                f"(V-shaped); set parallel.virtual_stages: {self.stages_per_rank}, got {v}"
            )
        if self.placement == "v" and pp < 2:
            raise ConfigError(f"parallel.schedule: {self.name} needs parallel.pp >= 2")
        if num_microbatches is None:
            return
        m = num_microbatches
        needed = self.min_microbatches_per_stage * pp * v
        if m < needed:
            raise ConfigError(
                f"train.global_batch_size: {self.name} needs at least {needed} microbatches per "
                f"pipeline (one per stage), got {m}; raise global_batch_size or lower "
                "micro_batch_size"
            )
        if self.name in ("interleaved_1f1b", "zero_bubble"):
            # torch runs rounds of pp microbatches.
            rounds = max(1, m // pp)
            if m % rounds:
                raise ConfigError(
                    f"train.global_batch_size: {m} microbatches per pipeline is not a multiple "
                    f"of the {rounds} rounds of parallel.pp={pp} that {self.name} runs; use a "
                    "multiple of parallel.pp"
                )


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", "ScheduleGPipe", 1, "looped", single_stage=True),
        ScheduleSpec("1f1b", "Schedule1F1B", 1, "looped", single_stage=True),
        ScheduleSpec("interleaved_1f1b", "ScheduleInterleaved1F1B", None, "looped", False),
        ScheduleSpec("zero_bubble", "ScheduleInterleavedZeroBubble", None, "looped", False),
        ScheduleSpec("zbv", "ScheduleZBVZeroBubble", 2, "v", single_stage=False),
        # torch: "DualPipeV requires at least as many microbatches as stages".
        ScheduleSpec("dualpipev", "ScheduleDualPipeV", 2, "v", False, min_microbatches_per_stage=1),
    )
}


def schedule_spec(name: str) -> ScheduleSpec:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ConfigError(
            f"parallel.schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        ) from None


def rank_ops(
    schedule: str, pp: int, pp_rank: int, num_microbatches: int, virtual_stages: int = 1
) -> list[Op]:
    """The order in which pipeline rank ``pp_rank`` runs its computations under ``schedule``."""
    spec = schedule_spec(schedule)
    m, v, r = num_microbatches, virtual_stages, pp_rank
    if m < 1 or pp < 1 or not 0 <= r < pp or v < 1:
        raise ConfigError(
            f"schedule: need microbatches >= 1 and 0 <= rank < pp, got m={m}, pp={pp}, rank={r}"
        )
    spec.check(pp, v, m)
    if schedule == "gpipe":
        return [Op("F", r, i) for i in range(m)] + [Op("B", r, i) for i in range(m)]
    if schedule == "1f1b":
        return _one_f_one_b(pp, r, m)
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        return _interleaved(pp, r, m, v, zero_bubble=schedule == "zero_bubble")
    if schedule == "zbv":
        return _zbv(pp, r, m)
    return _dualpipev(pp, r, m)


def _one_f_one_b(pp: int, r: int, m: int) -> list[Op]:
    """min(m, pp - rank) forwards, then backward/forward pairs."""
    warmup = min(m, pp - r)
    ops = [Op("F", r, i) for i in range(warmup)]
    for i in range(m):
        ops.append(Op("B", r, i))
        if warmup + i < m:
            ops.append(Op("F", r, warmup + i))
    return ops


def _interleaved(pp: int, r: int, m: int, v: int, zero_bubble: bool) -> list[Op]:
    """Rounds of microbatches, (v - 1) * round + 2 (zero bubble: 1) * (pp - 1 - rank) warmup
    forwards; under zero bubble the weight gradients trail by ``rank`` steps (torch's ZB1P)."""
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (pp - 1 - r), m * v)
    total = m * v
    fwd_next = [0] * v
    bwd_next = [0] * v
    backward_kind: OpKind = "I" if zero_bubble else "B"

    def forward(k: int) -> Op:
        chunk = (k // per_round) % v
        fwd_next[chunk] += 1
        return Op("F", chunk * pp + r, fwd_next[chunk] - 1)

    def backward(k: int) -> Op:
        chunk = v - 1 - ((k - warmup) // per_round) % v
        bwd_next[chunk] += 1
        return Op(backward_kind, chunk * pp + r, bwd_next[chunk] - 1)

    ops = [forward(k) for k in range(warmup)]
    pending_w: list[Op] = []
    for k in range(warmup, warmup + total):
        if k < total:
            ops.append(forward(k))
        b = backward(k)
        ops.append(b)
        if zero_bubble:
            pending_w.append(b)
            if k - warmup >= r:
                w = pending_w.pop(0)
                ops.append(Op("W", w.stage, w.microbatch))
    ops.extend(Op("W", w.stage, w.microbatch) for w in pending_w)
    return ops


class _Counter:
    """Next microbatch index per (kind, stage), as torch's generators count."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.next: dict[tuple[str, int], int] = {}

    def add(self, kind: OpKind, stage: int) -> Op:
        key = ("I" if kind == "B" else kind, stage)  # full and input-only backwards count as one
        op = Op(kind, stage, self.next.get(key, 0))
        self.next[key] = op.microbatch + 1
        self.ops.append(op)
        return op


def _zbv(pp: int, r: int, m: int) -> list[Op]:
    """torch's ScheduleZBVZeroBubble: warmup forwards of chunk 0, then chunk 1 interleaved, a
    steady phase of F-I-W on both chunks, a cooldown of input gradients, then the remaining
    weight gradients. It plans at least 2 * pp - 1 microbatches and drops the ones beyond m."""
    n = max(2 * pp - 1, m)
    c0, c1 = r, 2 * pp - 1 - r
    ops: list[Op] = []
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (pp - r) - 1):
        ops.append(Op("F", c0, f0))
        f0 += 1
    for _ in range(r):
        ops += [Op("F", c1, f1), Op("F", c0, f0)]
        f1, f0 = f1 + 1, f0 + 1
    for _ in range(pp - r):
        ops += [Op("F", c1, f1), Op("I", c1, b1), Op("W", c1, b1)]
        f1, b1 = f1 + 1, b1 + 1
    while f1 < f0 or f0 < n:
        if f0 < n:
            ops.append(Op("F", c0, f0))
            f0 += 1
        ops += [Op("I", c0, b0), Op("W", c0, b0), Op("F", c1, f1), Op("I", c1, b1)]
        ops.append(Op("W", c1, b1))
        b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
    w0, w1 = b0, b1
    for _ in range(r):
        ops += [Op("I", c0, b0), Op("I", c1, b1)]
        b0, b1 = b0 + 1, b1 + 1
    for _ in range(pp - r):
        ops += [Op("I", c0, b0), Op("W", c0, w0)]
        b0, w0 = b0 + 1, w0 + 1
    ops += [Op("W", c1, i) for i in range(w1, b1)]
    ops += [Op("W", c0, i) for i in range(w0, b0)]
    return [op for op in ops if op.microbatch < m]


def _dualpipev(pp: int, r: int, m: int) -> list[Op]:
    """torch's ScheduleDualPipeV (DeepSeek's DualPipe folded into a V): an overlapped
    forward+backward pair runs as its forward then its full backward; the first and the last
    backwards of each chunk are split into I and W (zero bubble)."""
    c = _Counter()
    s0, s1 = r, 2 * pp - 1 - r
    weights: list[tuple[int, int]] = []

    def add(kind: OpKind, stage: int) -> None:
        op = c.add(kind, stage)
        if kind == "I":
            weights.append((stage, op.microbatch))

    def weight_if_pending() -> None:
        if weights:
            stage, mb = weights.pop(0)
            c.ops.append(Op("W", stage, mb))

    for _ in range((pp - r - 1) * 2):
        add("F", s0)
    for _ in range(r + 1):
        add("F", s0)
        add("F", s1)
    for _ in range(pp - r - 1):
        add("I", s1)
        weight_if_pending()
        add("F", s1)
    for _ in range(m - 2 * pp + r + 1):
        # Overlapped F0 + B1, then F1 + B0 (torch runs the first pair of the last rank apart,
        # in the same order).
        add("F", s0)
        add("B", s1)
        add("F", s1)
        add("B", s0)
    for _ in range(pp - r - 1):
        add("B", s1)
        add("F", s1)
        add("B", s0)
    zero_bubble = False
    steps = r + 1
    for i in range(steps):
        if i == steps // 2 and r % 2 == 1:
            zero_bubble = True
        add("I" if zero_bubble else "B", s1)
        if i == steps // 2 and r % 2 == 0:
            zero_bubble = True
        add("I" if zero_bubble else "B", s0)
    for _ in range(pp - r - 1):
        weight_if_pending()
        add("I" if zero_bubble else "B", s0)
    for _ in range(r + 1):
        weight_if_pending()
    return c.ops
