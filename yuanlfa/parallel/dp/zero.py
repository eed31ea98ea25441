"""The distributed optimizer (ZeRO-1, the paper's "optimizer parallel").

Parameters are grouped by weight decay, by whether tensor parallelism shards them and by their
role in the pipeline's tied embedding, and each group is cut into gradient buckets
(:class:`~yuanlfa.parallel.dp.reducer.GradReducer`). Each data-parallel rank owns one
contiguous 1/dp slice of every bucket and keeps fp32 master weights and AdamW moments for that
slice only. Backward reduce-scatters each bucket as soon as its gradients are complete (each rank
receives the summed gradient of its slice); the step computes the global norm from the slices,
clips, steps its slice, and all-gathers the updated parameters into every replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.config import OptimConfig
from yuanlfa.parallel.dp.reducer import BUCKET_ELEMENTS, GradBucket, GradReducer, allreduce_flat
from yuanlfa.parallel.grads import sum_over
from yuanlfa.parallel.optim_state import StatePiece, adam_steps, init_adamw_state
from yuanlfa.parallel.roles import is_pipeline_copy, is_sharded, is_tied_across_stages


def fused_adamw(cfg: OptimConfig, device: torch.device | None) -> bool | None:
    """``fused`` for torch.optim.AdamW: optim.fused when set, else fused on CUDA (one kernel for
    every tensor's update); None lets torch pick its foreach path."""
    fused = cfg.fused if cfg.fused is not None else device is not None and device.type == "cuda"
    return fused or None


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights are not decayed (Megatron's rule: every 1-D parameter)."""
    return param.dim() == 1 or name.endswith(".bias")


@dataclass(eq=False)
class _Bucket:
    grads: GradBucket
    tp_sharded: bool
    pipeline_copy: bool  # counted in the gradient norm by the stage owning the original
    tied: bool  # the embedding shared by the first and last pipeline stage (alone in its bucket)
    shard: nn.Parameter  # this rank's fp32 master slice [numel_padded / dp]

    @property
    def params(self) -> list[nn.Parameter]:
        return self.grads.params

    @property
    def numel(self) -> int:
        return self.grads.numel


class ShardedAdamW:
    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        dp_group,
        tp_group=None,
        pp_group=None,
        *,
        shard: bool = True,
        embed_group=None,
        sequence_parallel: bool = False,
        bucket_elements: int = BUCKET_ELEMENTS,
        overlap: bool = True,
    ) -> None:
        """``shard`` False (or dp_group None): every replica holds the whole fp32 master copy and
        the gradients are all-reduced over dp_group (the unsharded mode of low-precision
        parameters). ``embed_group``: the first and last pipeline rank, whose tied embedding
        gradients are summed. ``sequence_parallel``: the gradients of tp-replicated parameters
        are partial sums to add over ``tp_group``. ``bucket_elements`` and ``overlap``: see
        :class:`~yuanlfa.parallel.dp.reducer.GradReducer`."""
        # dp_group/dp: the group the masters are sharded over (None/1 when replicated).
        replicas = dp_group
        if not shard or dp_group is None or dist.get_world_size(dp_group) == 1:
            dp_group = None
        self.dp_group, self.tp_group, self.pp_group = dp_group, tp_group, pp_group
        self.embed_group, self.sequence_parallel = embed_group, sequence_parallel
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.rank = rank = dist.get_rank(dp_group) if dp_group is not None else 0
        groups: dict[tuple[bool, bool, bool, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                tied = embed_group is not None and is_tied_across_stages(p)
                key = (not no_weight_decay(name, p), is_sharded(p), is_pipeline_copy(p), tied)
                groups.setdefault(key, []).append(p)
        keys = sorted(groups)
        # A tied embedding gets a bucket of its own on both stages, so the two ranks' slices
        # cover the same elements and can be summed slice by slice.
        self.reducer = GradReducer(
            [groups[k] for k in keys],
            replicas,
            scatter=dp_group is not None,
            bucket_elements=bucket_elements,
            overlap=overlap,
        )
        self.buckets: list[_Bucket] = []
        param_groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for gb in self.reducer.buckets:
            decay, tp_sharded, copy, tied = keys[gb.group]
            per_rank = -(-gb.numel // self.dp)
            flat = self._flat([p.detach() for p in gb.params], per_rank * self.dp)
            shard = nn.Parameter(flat[rank * per_rank : (rank + 1) * per_rank].clone())
            self.buckets.append(_Bucket(gb, tp_sharded, copy, tied, shard))
            param_groups[decay].append(shard)
        self.inner = torch.optim.AdamW(
            [
                {"params": shards, "weight_decay": cfg.weight_decay * decay}
                for decay, shards in param_groups.items()
                if shards
            ],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=fused_adamw(cfg, self.buckets[0].shard.device if self.buckets else None),
        )

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @staticmethod
    def _flat(tensors: list[torch.Tensor], padded: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, padded - flat.numel()))

    def start_step(self, backward_passes: int) -> None:
        """Zero the gradients and arm the overlapped reduction for this step's backward passes."""
        self.reducer.start(backward_passes)

    def reduce_gradients(self, across: dist.ProcessGroup | None = None) -> float:
        """Finish the reduce-scatter of the gradients onto the slices (most of it already ran
        during backward); sum what other ranks hold (tied embedding, sequence-parallel partial
        sums; with ``across``, the same slice in other islands); return the global gradient
        norm."""
        self.reducer.finish()
        for b in self.buckets:
            b.shard.grad = b.grads.reduced
        if across is not None:
            allreduce_flat([b.shard.grad for b in self.buckets], across)
        if self.sequence_parallel and self.tp_group is not None:
            # Linear, so summing the dp-reduced slices equals reducing the tp-summed gradients.
            allreduce_flat([b.shard.grad for b in self.buckets if not b.tp_sharded], self.tp_group)
        if self.embed_group is not None:
            tied = [b.shard.grad for b in self.buckets if b.tied]
            allreduce_flat(tied, self.embed_group)
        device = self.buckets[0].shard.device  # NCCL reduces device tensors only
        sharded_sq = torch.zeros((), dtype=torch.float64, device=device)
        replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
        for b in self.buckets:
            if b.pipeline_copy:
                continue
            sq = b.shard.grad.double().pow(2).sum()
            if b.tp_sharded:
                sharded_sq += sq
            else:
                replicated_sq += sq
        totals = torch.stack((sharded_sq, replicated_sq))
        sum_over(totals, self.dp_group)  # the slices partition each bucket
        # Tensor-parallel shards differ across tp ranks; replicated parameters count once.
        sum_over(totals[:1], self.tp_group)
        return math.sqrt(float(sum_over(totals.sum(), self.pp_group)))

    def clip(self, max_norm: float, total_norm: float) -> None:
        if max_norm > 0 and math.isfinite(total_norm):
            coef = max_norm / (total_norm + 1e-6)
            if coef < 1.0:
                for b in self.buckets:
                    b.shard.grad.mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        works = []
        if self.dp > 1:
            # Gather into the gradient buffers (same size, consumed by the step) instead of
            # allocating; all buckets in flight at once.
            for b in self.buckets:
                b.shard.grad = None
                works.append(
                    dist.all_gather_into_tensor(
                        b.grads.grad, b.shard.detach(), group=self.dp_group, async_op=True
                    )
                )
        for i, b in enumerate(self.buckets):
            flat = b.shard.detach()
            if works:
                works[i].wait()
                flat = b.grads.grad
            offset = 0
            for p in b.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    @torch.no_grad()
    def reload_masters(self) -> None:
        """Take the fp32 masters from the parameters again, after something other than this
        optimizer changed them (the outer step of islands, yuanlfa.parallel.islands)."""
        for b in self.buckets:
            per_rank = b.shard.numel()
            flat = self._flat([p.detach() for p in b.params], per_rank * self.dp)
            b.shard.copy_(flat[self.rank * per_rank : (self.rank + 1) * per_rank])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.reducer.zero()
        for b in self.buckets:
            b.shard.grad = None
            for p in b.params:
                p.grad = None

    def state_bytes(self) -> int:
        """Bytes of master weights and optimizer states held by this rank."""
        total = sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        for state in self.inner.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if t.dim() > 0)
        return total

    def checkpoint_state(self) -> ShardedState:
        return ShardedState(self)


class ShardedState:
    """The checkpoint view of :class:`ShardedAdamW` (see yuanlfa.parallel.optim_state): per
    parameter, the part of its flat elements inside this rank's slice of its bucket."""

    def __init__(self, optimizer: ShardedAdamW) -> None:
        self.optimizer = optimizer
        self.sharded = optimizer.dp > 1

    def steps(self) -> int:
        return adam_steps(self.optimizer.inner)

    def prepare(self, steps: int) -> None:
        init_adamw_state(self.optimizer.inner, steps)

    def pieces(self) -> list[StatePiece]:
        out = []
        for b in self.optimizer.buckets:
            state = self.optimizer.inner.state[b.shard]
            per_rank = b.shard.numel()
            lo_rank = self.optimizer.rank * per_rank
            offset = 0
            for p in b.params:
                lo, hi = max(lo_rank, offset), min(lo_rank + per_rank, offset + p.numel())
                if lo < hi:
                    local = slice(lo - lo_rank, hi - lo_rank)
                    exp_avg, exp_avg_sq = state["exp_avg"][local], state["exp_avg_sq"][local]
                    master = b.shard.data[local]
                    out.append(StatePiece(p, lo - offset, hi - offset, exp_avg, exp_avg_sq, master))
                offset += p.numel()
        return out
