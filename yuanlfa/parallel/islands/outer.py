"""The outer loop joining islands: DiLoCo and Streaming DiLoCo on this rank's piece of the model.

Each island trains on its own (its inner optimizer, dp reduction inside the island). Every
rank keeps the *anchor*: its parameters as of the last synchronization, in fp32.

**DiLoCo** (Douillard et al. 2023). After every ``H = outer.sync_every`` inner steps:
pseudo-gradient ``Δ = anchor - θ`` (on this rank's tp/pp piece), averaged over the ranks holding
the same piece in every island; the outer optimizer (``torch.optim.SGD`` with ``outer.lr``,
``outer.momentum``, ``outer.nesterov``) steps the anchor with gradient ``mean(Δ)``; the parameters
become the new anchor. The inner optimizer's state is left as it is.

**Streaming DiLoCo** (Douillard et al. 2025). The layers are split into ``P = outer.fragments``
contiguous fragments (the embedding goes with the first, the final norm and head with the last).
Fragment ``p`` synchronizes at the steps ``t > 0`` with ``(t - p * H / P) % H == 0``: the
fragments take turns, each every ``H`` steps. At ``t`` its pseudo-gradient is taken and its
all-reduce started; the outer step is applied ``τ = outer.fragment_delay`` inner steps later (the
exchange overlaps those steps' compute): the anchor steps as above with the gradient from ``t``,
and the fragment's parameters become ``lerp(anchor, θ_now, α)`` with ``α = outer.fragment_mix``
(0: the outer result replaces the ``τ`` local steps' changes; torchft's fragment_update_alpha),
or with ``outer.fragment_merge: carry`` ``anchor + (θ_now - θ_t)``: the outer result plus the
island's own change over the ``τ`` steps, which then enters the next pseudo-gradient (no local
step is lost or counted twice). The anchor is the outer result, not the merge. With ``P = 1``
and ``τ = 0`` this is DiLoCo.

**Synchronous warm start** (``outer.warm_start_steps = K``; DiLoCo starts its islands from a
model trained synchronously). The first ``K`` steps the trainer sums each step's reduced
gradients over the islands too (the grad sync's ``across`` group: the ranks holding the same
piece, as the exchange), so the islands are one data-parallel run of ``islands * dp`` replicas
with the same parameters and inner optimizer state; after step ``K`` the anchors are set to those
parameters and the outer loop above counts its steps from ``K``. The gradients rather than an
every-step outer step: an outer step averages parameters after each island's own AdamW update,
which is not the synchronous run's update (AdamW is not linear in the gradient).

The exchange is sharded over the island's dp ranks (whose parameters are equal): each sends and
steps the outer optimizer on a disjoint 1/dp chunk, then the island all-gathers the new anchor
over dp, so the link carries each piece once per island.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.config import OuterConfig
from yuanlfa.layout.traffic import ring_all_reduce_bytes
from yuanlfa.parallel.islands.link import island_dp_sum
from yuanlfa.parallel.mesh import Mesh

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class Work(Protocol):
    def wait(self) -> Any: ...


class Exchange(Protocol):
    """Sums a tensor in place over the ranks holding this piece in every live island. An
    exchange round is ``begin`` (who takes part: torchft's quorum), ``start_sum`` per fragment
    due, then ``commit`` (whether every island may apply the outer step), ``fragment_delay``
    steps after ``begin`` (0: in the same step)."""

    def size(self) -> int: ...

    def begin(self, step: int) -> None: ...

    def start_sum(self, tensor: torch.Tensor) -> Work: ...

    def commit(self) -> bool: ...

    def healthy(self) -> bool:
        """False after a failure in the current round (its commit will say no)."""
        ...


class GroupExchange:
    """The cross-island process group of a single launch (``mesh.island_group``)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    def begin(self, step: int) -> None:
        return None

    def commit(self) -> bool:
        return True

    def healthy(self) -> bool:
        return True

    def start_sum(self, tensor: torch.Tensor) -> Work:
        if self.group is None:
            return _Done()
        return dist.all_reduce(tensor, group=self.group, async_op=True)


class _Done:
    def wait(self) -> None:
        return None


def fragment_of_layers(num_layers: int, fragments: int) -> list[int]:
    """Fragment index of each layer: ``fragments`` contiguous, near-even runs of layers."""
    return [layer * fragments // num_layers for layer in range(num_layers)]


def fragment_of_param(name: str, layer_fragment: list[int], fragments: int) -> int:
    match = _LAYER.search(name)
    if match is not None:
        return layer_fragment[int(match.group(1))]
    # Outside the layers: the embedding goes with the first fragment, the rest (final norm,
    # head) with the last.
    return 0 if "embed" in name else fragments - 1


@dataclass
class _Fragment:
    params: list[nn.Parameter]
    anchor: torch.Tensor  # [numel padded to dp], fp32: the parameters at the last sync
    chunk: nn.Parameter  # this dp rank's slice of the anchor, what the outer SGD steps
    lo: int
    hi: int
    numel: int
    offset: int  # the step of its first synchronization (p * H / P)
    wire_bytes: float  # the fragment's bytes on the wire, summed over the island's ranks


@dataclass
class _Pending:
    apply_at: int
    fragment: int
    delta: torch.Tensor
    work: Work
    islands: int  # the round's participants (what the sum is divided by)
    # Whether the round's commit is still to be asked (a live exchange round). A round restored
    # from a checkpoint was finished before the save and is applied as it is.
    open: bool = True
    # fragment_merge carry: this rank's piece of the fragment's parameters when the exchange
    # started (padded flat, fp32), to carry the local change since over the outer step.
    start: torch.Tensor | None = None
    # outer.average_moments: this rank's chunk of the inner AdamW moments being summed.
    moments: torch.Tensor | None = None
    moments_work: Work | None = None


class OuterSync:
    """The outer step of one rank. Call :meth:`after_step` after every inner optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        cfg: OuterConfig,
        num_layers: int,
        exchange: Exchange,
        reload_masters: Callable[[], None] | None = None,
        warm_start_bytes: int = 0,
        optimizer: Any = None,
    ) -> None:
        """``warm_start_bytes``: what the island sends across the link in a step of the
        synchronous warm start (``outer.warm_start_steps``; the trainer reduces its gradients).
        ``optimizer``: the inner optimizer, whose moments ``outer.average_moments`` averages
        (torch's AdamW or :class:`~yuanlfa.parallel.dp.zero.ShardedAdamW`)."""
        self.cfg, self.mesh, self.exchange = cfg, mesh, exchange
        self.warm_start_bytes = warm_start_bytes
        self.inner = optimizer
        keys = {"none": (), "first": ("exp_avg",), "both": ("exp_avg", "exp_avg_sq")}
        self.moment_keys = keys[cfg.average_moments]
        if self.moment_keys and optimizer is None:
            raise ValueError("outer.average_moments needs the inner optimizer")
        self.reload_masters = reload_masters
        count = cfg.fragments if cfg.algorithm == "streaming_diloco" and cfg.fragments else 1
        layer_fragment = fragment_of_layers(num_layers, count)
        groups: list[list[nn.Parameter]] = [[] for _ in range(count)]
        for name, p in model.named_parameters():
            groups[fragment_of_param(name, layer_fragment, count)].append(p)
        self.dp_group = mesh.dp_group if not mesh.joined else None
        dp = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self.dp = dp
        self.fragments: list[_Fragment] = []
        wire = 2 if cfg.quantize else 4
        own = []
        for p_index, params in enumerate(groups):
            flat = self._flat(params)
            per_rank = -(-flat.numel() // dp)
            anchor = torch.nn.functional.pad(flat, (0, per_rank * dp - flat.numel()))
            lo, hi = dp_rank * per_rank, (dp_rank + 1) * per_rank
            chunk = nn.Parameter(anchor[lo:hi].clone())
            offset = p_index * cfg.sync_every // count
            self.fragments.append(_Fragment(params, anchor, chunk, lo, hi, flat.numel(), offset, 0))
            own.append(per_rank * wire)
        # The moments: a ZeRO-1 optimizer holds a disjoint slice on each dp rank (sent whole);
        # a replicated one the same moments on every dp rank (each sends a 1/dp chunk, then the
        # island all-gathers the averages, as the anchor).
        self.moments_sharded = getattr(optimizer, "dp", 1) > 1
        per_rank = self._moment_numel() * len(self.moment_keys)
        if not self.moments_sharded:
            per_rank = -(-per_rank // dp)
        self.moment_chunk = per_rank
        own.append(4 * per_rank)  # fp32 on the wire
        *totals, moment_total = island_dp_sum(own, mesh)
        for f, total in zip(self.fragments, totals):
            f.wire_bytes = total
        self.moment_wire_bytes = moment_total
        # The step a live island healed this one to (torchft's recovery; set by the state
        # callbacks through :meth:`healed`).
        self.healed_to: int | None = None
        momentum = cfg.momentum
        self.optimizer = torch.optim.SGD(
            [f.chunk for f in self.fragments],
            lr=cfg.lr,
            momentum=momentum,
            nesterov=cfg.nesterov and momentum > 0,
        )
        self.pending: list[_Pending] = []

    def _moment_params(self) -> list[torch.Tensor]:
        """The tensors whose AdamW state this rank holds, in a fixed order (every island the
        same)."""
        if not self.moment_keys:
            return []
        buckets = getattr(self.inner, "buckets", None)
        if buckets is not None:  # ShardedAdamW: its slices
            return [b.shard for b in buckets]
        return [p for group in self.inner.param_groups for p in group["params"]]

    def _moment_numel(self) -> int:
        return sum(p.numel() for p in self._moment_params())

    def _moment_state(self) -> list[dict[str, torch.Tensor]]:
        inner = getattr(self.inner, "inner", self.inner)  # ShardedAdamW wraps torch's AdamW
        return [inner.state.get(p, {}) for p in self._moment_params()]

    def _moments_chunk(self) -> torch.Tensor:
        """This rank's share of the moments, flat fp32 (zeros where a state does not exist yet:
        no inner step has run)."""
        parts = []
        for state, p in zip(self._moment_state(), self._moment_params()):
            for key in self.moment_keys:
                t = state.get(key)
                parts.append(p.new_zeros(p.numel()) if t is None else t.detach().reshape(-1))
        flat = torch.cat([t.float() for t in parts])
        if self.moments_sharded:
            return flat
        rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        flat = torch.nn.functional.pad(flat, (0, self.moment_chunk * self.dp - flat.numel()))
        return flat[rank * self.moment_chunk : (rank + 1) * self.moment_chunk].clone()

    def _set_moments(self, chunk: torch.Tensor) -> None:
        """The averaged moments back into the inner optimizer's state."""
        flat = chunk
        if not self.moments_sharded:
            flat = chunk.new_empty(self.moment_chunk * self.dp)
            if self.dp_group is not None:
                dist.all_gather_into_tensor(flat, chunk, group=self.dp_group)
            else:
                flat.copy_(chunk)
        offset = 0
        for state, p in zip(self._moment_state(), self._moment_params()):
            for key in self.moment_keys:
                t = state.get(key)
                if t is not None:
                    t.copy_(flat[offset : offset + p.numel()].view_as(t))
                offset += p.numel()

    @staticmethod
    def _flat(params: list[nn.Parameter]) -> torch.Tensor:
        if not params:
            return torch.zeros(0)
        return torch.cat([p.detach().reshape(-1).float() for p in params])

    def synchronous(self, step: int) -> bool:
        """Whether inner step ``step`` (0-based: the step about to run) is one of the warm
        start's, whose gradients are reduced across the islands."""
        return step < self.cfg.warm_start_steps

    def due(self, step: int) -> list[int]:
        """The fragments whose exchange starts after inner step ``step`` (counted from the end
        of the warm start)."""
        h, t = self.cfg.sync_every, step - self.cfg.warm_start_steps
        return [
            i
            for i, f in enumerate(self.fragments)
            if t > 0 and t >= f.offset and (t - f.offset) % h == 0
        ]

    def _restart(self) -> None:
        """The end of the warm start: the islands hold the same parameters (they stepped
        together); those are the first anchor. No outer step has happened, so the outer
        optimizer has no state to reset."""
        for f in self.fragments:
            flat = self._flat(f.params)
            f.anchor.copy_(torch.nn.functional.pad(flat, (0, f.anchor.numel() - f.numel)))
            f.chunk.copy_(f.anchor[f.lo : f.hi])

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, Any]:
        """After inner step ``step`` (1-based count of steps done): apply the exchanges due now,
        start the ones that begin now. Returns the record fields."""
        if step <= self.cfg.warm_start_steps:
            if step == self.cfg.warm_start_steps:
                self._restart()
            # No outer step; the link carried the step's gradient reduction.
            return {
                "outer_sync": False,
                "link_bytes": self.warm_start_bytes,
                "islands_alive": self.exchange.size(),
                "warm_start": True,
            }
        synced = False
        finishing = [q for q in self.pending if q.apply_at <= step]
        if finishing:
            # A round started fragment_delay steps ago: wait for its sums, commit, apply. Before
            # this step's round begins: with per-island launches the rounds never overlap (the
            # config check), so each quorum is closed by its own commit.
            self.pending = [q for q in self.pending if q.apply_at > step]
            synced = self._finish(finishing)
        due = self.due(step)
        sent = 0
        if due:
            self.exchange.begin(step)
            if self.healed_to is not None:
                # A live island is healed only when it is behind a peer: islands stepping
                # together never are.
                raise RuntimeError(
                    f"island healed from step {step} to {self.healed_to} in the middle of its "
                    "run: the islands' step counts diverged"
                )
            now, sent = self._round(step, due)
            synced = synced or now
        return {"outer_sync": synced, "link_bytes": sent, "islands_alive": self.exchange.size()}

    @torch.no_grad()
    def join(self, step: int) -> int:
        """The first quorum of a per-island launch (at ``step``: 0, or the resumed step). A
        live island ahead of this one heals it (the state callbacks load its parameters, anchor,
        outer and inner optimizer state and step); this island then takes part in the live
        island's exchange round, as the live one does (with a delay: its sums started here, its
        commit and outer step ``fragment_delay`` steps later, in :meth:`after_step`, as the live
        island's). Returns the step to continue from."""
        self.exchange.begin(step)
        if self.healed_to is None:
            self.exchange.commit()  # the round's closing call (torchft's step bookkeeping)
            return step
        step, self.healed_to = self.healed_to, None
        due = self.due(step)
        if due:
            self._round(step, due)
        else:
            self.exchange.commit()
        return step

    def healed(self, step: int) -> None:
        self.healed_to = step

    def _round(self, step: int, due: list[int]) -> tuple[bool, int]:
        """Start the exchange of the fragments ``due`` after ``step``; apply them now (no delay,
        when every island may commit) or ``fragment_delay`` steps later (:meth:`_finish`)."""
        n = self.exchange.size()
        sent = 0
        started = []
        for i in due:
            f = self.fragments[i]
            current = torch.nn.functional.pad(self._flat(f.params), (0, f.anchor.numel() - f.numel))
            delta = f.anchor[f.lo : f.hi] - current[f.lo : f.hi]
            if self.cfg.quantize:
                delta = delta.to(torch.bfloat16)
            carry = self.cfg.fragment_merge == "carry" and self.cfg.fragment_delay > 0
            work = self.exchange.start_sum(delta)
            start = current if carry else None
            started.append(_Pending(step + self.cfg.fragment_delay, i, delta, work, n, start=start))
            sent += round(ring_all_reduce_bytes(f.wire_bytes, n))
        if self.moment_keys:  # diloco (validated): one fragment, no delay
            moments = self._moments_chunk()
            started[-1].moments = moments
            started[-1].moments_work = self.exchange.start_sum(moments)
            sent += round(ring_all_reduce_bytes(self.moment_wire_bytes, n))
        if self.cfg.fragment_delay:
            self.pending.extend(started)
            return False, sent
        return self._finish(started), sent

    def _finish(self, round_: list[_Pending]) -> bool:
        """Wait for a round's sums, ask its commit, apply its outer steps when committed.
        Returns whether they were applied."""
        for pending in round_:
            pending.work.wait()
            pending.work = _Done()
            if pending.moments_work is not None:
                pending.moments_work.wait()
                pending.moments_work = None
        if any(q.open for q in round_) and not self.exchange.commit():
            # An island failed during the exchange: no outer step; the local progress stays
            # and enters the next exchange's pseudo-gradient.
            return False
        for pending in round_:
            self._apply(pending)
        return True

    def _apply(self, pending: _Pending) -> None:
        f = self.fragments[pending.fragment]
        pending.work.wait()
        f.chunk.grad = pending.delta.float() / pending.islands
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dp_group is not None:
            dist.all_gather_into_tensor(f.anchor, f.chunk.detach(), group=self.dp_group)
        else:
            f.anchor.copy_(f.chunk.detach())
        mix = self.cfg.fragment_mix
        offset = 0
        for p in f.params:
            new = f.anchor[offset : offset + p.numel()].view_as(p)
            if pending.start is not None:
                since = p.detach().float() - pending.start[offset : offset + p.numel()].view_as(p)
                new = new + since
            elif mix:
                new = torch.lerp(new, p.detach().float(), mix)
            p.copy_(new)
            offset += p.numel()
        if self.reload_masters is not None:
            self.reload_masters()
        if pending.moments is not None:
            self._set_moments(pending.moments / pending.islands)

    def state_dict(self) -> dict[str, Any]:
        """The anchor (last synchronized parameters), the outer momentum, exchanges in flight
        (finished first: a checkpoint holds no open communication). A round whose exchange
        failed is left out: its commit would say no, and without it the local progress stays,
        as in the run that goes on."""
        pending = [
            (q.apply_at, q.fragment, self._finished(q), q.islands, q.start) for q in self.pending
        ]
        return {
            "anchors": [f.anchor.clone() for f in self.fragments],
            "chunks": [f.chunk.detach().clone() for f in self.fragments],
            "optimizer": self.optimizer.state_dict(),
            "pending": pending if self.exchange.healthy() else [],
        }

    def _finished(self, pending: _Pending) -> torch.Tensor:
        pending.work.wait()
        pending.work = _Done()
        return pending.delta.clone()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for f, anchor, chunk in zip(self.fragments, state["anchors"], state["chunks"]):
                f.anchor.copy_(anchor)
                f.chunk.copy_(chunk)
        self.optimizer.load_state_dict(state["optimizer"])
        # Restored rounds were finished when saved: applied at their step without a commit (the
        # quorum they belonged to is gone). Their participant count travels with them (older
        # checkpoints: the configured count), and with fragment_merge carry their start.
        self.pending = []
        for entry in state["pending"]:
            islands = entry[3] if len(entry) > 3 else self.exchange.size()
            start = entry[4] if len(entry) > 4 else None
            self.pending.append(
                _Pending(entry[0], entry[1], entry[2], _Done(), islands, False, start)
            )
