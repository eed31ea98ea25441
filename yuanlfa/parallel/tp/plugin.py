"""Tensor and sequence parallelism for registered filters and core attentions (plug-ins).

A plug-in's ``tp_plan`` (yuanlfa.model.registry) names what it shards; everything else is
replicated. Parameter names never change (the modules are modified in place), so checkpoints
and the layout-independent initialization see the single-device names.

Gradients of replicated parameters follow the library's rule: a rank's gradient is complete
when the rank saw the whole input, and partial otherwise (summed over tp after backward by the
trainer, as for norms under sequence parallelism). A filter sees the whole sequence without
sequence parallelism and its shard with it; a core attention sees only this rank's heads, so
without sequence parallelism its replicated parameters pass through ``copy_to_tp`` (identity
forward, all-reduced gradient) to make each rank's gradient complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from yuanlfa.config import ConfigError, ModelConfig
from yuanlfa.model.registry import Entry, RegistryError, get_entry, param_style, style_dim
from yuanlfa.parallel.roles import is_sharded
from yuanlfa.parallel.tp.comm import copy_to_tp, gather_seq, prev_halo
from yuanlfa.parallel.tp.layers import ColumnParallelLinear, RowParallelLinear, sharded_param

Shard = Callable[[str, torch.Tensor], torch.Tensor]


def _shard_module(
    module: nn.Module,
    entry: Entry,
    prefix: str,
    group,
    sequence_parallel: bool,
    shard: Shard,
) -> bool:
    """Swap the planned nn.Linear submodules for column/row-parallel ones and cut split:D
    parameters to this rank's slice. Returns whether anything is sharded."""
    tp = dist.get_world_size(group)
    what = f"{entry.kind} {entry.name!r} ({entry.origin})"
    sharded = False
    for path, style in entry.tp_plan.items():
        if style == "replicated":
            continue
        if style in ("column", "row"):
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                raise RegistryError(
                    f"{what}: tp_plan names submodule {path!r}, which it does not have; its "
                    f"submodules: {', '.join(n for n, _ in module.named_modules() if n) or 'none'}"
                ) from None
            if type(sub) is not nn.Linear:
                raise RegistryError(
                    f"{what}: tp_plan[{path!r}] = {style!r} needs an nn.Linear, got "
                    f"{type(sub).__name__}"
                )
            dim = 0 if style == "column" else 1
            _check_divisible(what, f"{path}.weight", sub.weight.shape[dim], tp)
            weight = shard(f"{prefix}.{path}.weight", sub.weight)
            bias = shard(f"{prefix}.{path}.bias", sub.bias) if sub.bias is not None else None
            cls = ColumnParallelLinear if style == "column" else RowParallelLinear
            set_submodule(module, path, cls(weight, group, sequence_parallel, bias=bias))
        else:
            dim = style_dim(style)
            try:
                param = module.get_parameter(path)
            except AttributeError:
                raise RegistryError(
                    f"{what}: tp_plan names parameter {path!r}, which it does not have; its "
                    f"parameters: {', '.join(n for n, _ in module.named_parameters()) or 'none'}"
                ) from None
            if dim >= param.dim():
                raise RegistryError(
                    f"{what}: tp_plan[{path!r}] = {style!r}, but the parameter has "
                    f"{param.dim()} dims {tuple(param.shape)}"
                )
            _check_divisible(what, path, param.shape[dim], tp)
            set_submodule(module, path, sharded_param(shard(f"{prefix}.{path}", param)))
        sharded = True
    return sharded


def _check_divisible(what: str, path: str, size: int, tp: int) -> None:
    if size % tp:
        raise ConfigError(
            f"parallel.tp: {what} shards {path} along a dim of {size}, not divisible by tp={tp}"
        )


def set_submodule(module: nn.Module, path: str, value: nn.Module | nn.Parameter) -> None:
    """Replace the submodule or parameter at dotted ``path``."""
    owner_path, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(owner_path) if owner_path else module, leaf, value)


class SequenceParallelFilterForward:
    """A filter's forward on this rank's sequence shard x [s/tp, b, h] (doc_start: [s, b] for the
    whole sequence). receptive_field r: the previous shard's last r tokens are prepended and
    their outputs dropped (their gradient goes back to the rank owning them); None (or a halo
    longer than the shard): the whole sequence is gathered and this rank's rows kept."""

    def __init__(self, module: nn.Module, forward: Callable, group) -> None:
        self.forward = forward
        self.receptive_field = module.receptive_field
        self.group = group

    def __call__(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        rank = dist.get_rank(self.group)
        s = x.shape[0]
        lo, hi = rank * s, (rank + 1) * s
        r = self.receptive_field
        if r == 0:
            return self.forward(x, doc_start=doc_start[lo:hi] if doc_start is not None else None)
        if r is None or r > s:
            # Each rank differentiates only its own rows; gather_seq's backward sums the ranks'
            # input gradients, and parameter gradients are partial sums (added over tp).
            full = gather_seq(x, self.group)
            return self.forward(full, doc_start=doc_start)[lo:hi]
        halo = prev_halo(x, r, self.group)
        if rank == 0:
            out = self.forward(x, doc_start=doc_start[:hi] if doc_start is not None else None)
            # The sequence starts here; the halo stays in the graph (times zero) so every rank
            # runs the exchange's backward collective.
            return out + (halo * 0).sum()
        starts = doc_start[lo - r : hi] if doc_start is not None else None
        return self.forward(torch.cat((halo, x)), doc_start=starts)[r:]


class ReplicatedParamsForward:
    """A core attention's forward whose replicated parameters pass through copy_to_tp: each rank
    sees only its heads, so their gradients are all-reduced over tp to be complete."""

    def __init__(self, module: nn.Module, forward: Callable, names: list[str], group) -> None:
        self.module_ref = [module]  # in a list: not an attribute cycle nn.Module walks
        self.forward = forward
        self.names = names
        self.group = group

    def __call__(self, *args, **kwargs):
        with self._through_copy():
            return self.forward(*args, **kwargs)

    @contextlib.contextmanager
    def _through_copy(self) -> Iterator[None]:
        module = self.module_ref[0]
        saved = []
        try:
            for name in self.names:
                owner_path, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                param = owner._parameters[leaf]
                saved.append((owner, leaf, param))
                # Looked up per call: materialize and checkpoint loading replace the objects.
                owner._parameters[leaf] = copy_to_tp(param, self.group)
            yield
        finally:
            for owner, leaf, param in saved:
                owner._parameters[leaf] = param


def apply_filter_plan(
    module: nn.Module,
    cfg: ModelConfig,
    prefix: str,
    group,
    sequence_parallel: bool,
    shard: Shard,
) -> None:
    """Shard a filter per its tp_plan; under sequence parallelism give it its halo."""
    entry = get_entry("filter", cfg.filter_name)
    sharded = _shard_module(module, entry, prefix, group, sequence_parallel, shard)
    if not sequence_parallel:
        return
    r = module.receptive_field
    if sharded and r != 0:
        raise ConfigError(
            f"parallel.sequence_parallel: filter {entry.name!r} ({entry.origin}) shards "
            f"parameters over tp and declares receptive_field={r}. Under sequence parallelism "
            "its column-parallel layers see the whole sequence and everything else a shard, so "
            "a halo cannot be added: set receptive_field = 0 if all its mixing along the "
            "sequence happens between its column- and row-parallel layers, keep its parameters "
            "replicated, or turn sequence_parallel off"
        )
    module.forward = SequenceParallelFilterForward(module, module.forward, group)


def apply_attention_plan(
    module: nn.Module,
    cfg: ModelConfig,
    prefix: str,
    group,
    sequence_parallel: bool,
    shard: Shard,
) -> None:
    """Shard a core attention per its tp_plan (it always sees the whole sequence)."""
    entry = get_entry("attention", cfg.attention)
    _shard_module(module, entry, prefix, group, False, shard)
    if sequence_parallel:
        return  # partial gradients of replicated parameters are summed after backward
    replicated = [
        name
        for name, p in module.named_parameters()
        if not is_sharded(p) and param_style(entry.tp_plan, name) is None
    ]
    if replicated:
        module.forward = ReplicatedParamsForward(module, module.forward, replicated, group)
