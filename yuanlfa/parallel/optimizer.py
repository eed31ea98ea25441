"""The distributed optimizer (ZeRO-1, the paper's "optimizer parallel").

Parameters are grouped into flat buckets (by weight decay, and by whether tensor parallelism
shards them); each data-parallel rank owns one contiguous 1/dp slice of every bucket and keeps
fp32 master weights and AdamW moments for that slice only. A step reduce-scatters the gradients
(each rank receives the summed gradient of its slice), computes the global norm from the slices,
clips, steps its slice, and all-gathers the updated parameters into every replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.config import OptimConfig
from yuanlfa.parallel.comm import _reduce_scatter
from yuanlfa.parallel.grads import grad_of, is_pipeline_copy, is_sharded, sum_over


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights are not decayed (Megatron's rule: every 1-D parameter)."""
    return param.dim() == 1 or name.endswith(".bias")


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    tp_sharded: bool
    pipeline_copy: bool  # counted in the gradient norm by the stage owning the original
    numel: int
    shard: nn.Parameter  # this rank's fp32 master slice [numel_padded / dp]


class ShardedAdamW:
    def __init__(
        self, model: nn.Module, cfg: OptimConfig, dp_group, tp_group=None, pp_group=None
    ) -> None:
        """dp_group None: one replica holds the whole fp32 master copy (the unsharded mode of
        low-precision parameters, and data parallelism of 1)."""
        self.dp_group, self.tp_group, self.pp_group = dp_group, tp_group, pp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        rank = dist.get_rank(dp_group) if dp_group is not None else 0
        groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = (not no_weight_decay(name, p), is_sharded(p), is_pipeline_copy(p))
                groups.setdefault(key, []).append(p)
        self.buckets: list[_Bucket] = []
        param_groups = []
        for (decay, tp_sharded, copy), params in sorted(groups.items()):
            numel = sum(p.numel() for p in params)
            per_rank = -(-numel // self.dp)
            flat = self._flat([p.detach() for p in params], per_rank * self.dp)
            shard = nn.Parameter(flat[rank * per_rank : (rank + 1) * per_rank].clone())
            self.buckets.append(_Bucket(params, tp_sharded, copy, numel, shard))
            param_groups.append({"params": [shard], "weight_decay": cfg.weight_decay * decay})
        self.inner = torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @staticmethod
    def _flat(tensors: list[torch.Tensor], padded: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, padded - flat.numel()))

    def reduce_gradients(self) -> float:
        """Reduce-scatter the gradients onto the slices; return the global gradient norm."""
        device = self.buckets[0].shard.device  # NCCL reduces device tensors only
        sharded_sq = torch.zeros((), dtype=torch.float64, device=device)
        replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
        for b in self.buckets:
            grads = [grad_of(p) for p in b.params]
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, b.params)]
            flat = self._flat(grads, b.shard.numel() * self.dp)
            if self.dp > 1:
                shard_grad = torch.empty_like(b.shard)
                _reduce_scatter(shard_grad, flat, group=self.dp_group)
            else:
                shard_grad = flat
            b.shard.grad = shard_grad
            sq = shard_grad.double().pow(2).sum()
            if b.pipeline_copy:
                continue
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
        for b in self.buckets:
            flat = b.shard.detach()
            if self.dp > 1:
                parts = [torch.empty_like(b.shard) for _ in range(self.dp)]
                dist.all_gather(parts, b.shard.detach(), group=self.dp_group)
                flat = torch.cat(parts)
            offset = 0
            for p in b.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.shard.grad = None
            for p in b.params:
                p.grad = None
                if hasattr(p, "main_grad"):
                    p.main_grad = None

    def state_bytes(self) -> int:
        """Bytes of master weights and optimizer states held by this rank."""
        total = sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        for state in self.inner.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if t.dim() > 0)
        return total
