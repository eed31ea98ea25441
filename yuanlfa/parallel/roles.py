"""What a parameter is to the parallel code, recorded once by :func:`~yuanlfa.parallel.parallelize`
(and the tp layers) and read by gradient synchronization, the optimizers and checkpoints.

One frozen :class:`ParamRole` per parameter instead of loose attributes: a reader finds every
role a parameter can play here. It rides on the parameter object (``materialize`` keeps a
parameter's attributes when it allocates it), so any holder of the parameter can ask.

The other attribute the parallel code puts on parameters is ``main_grad``, the fp32 view into a
:class:`~yuanlfa.parallel.dp.reducer.GradReducer` bucket where gradients accumulate (Megatron's
name); :func:`yuanlfa.parallel.grads.grad_of` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

_ATTR = "yuanlfa_role"


@dataclass(frozen=True)
class ParamRole:
    # Holds this tp rank's slice (summed over tp in the gradient norm; one writer per slice in
    # checkpoints); otherwise replicated over tp (counted once, written by tp rank 0).
    tp_sharded: bool = False
    # The embedding shared by the first and last pipeline stage (tied to the head): its
    # gradients are summed over the two stages each step.
    pipeline_tied: bool = False
    # The last stage's copy of that embedding: counted in the norm and saved by the first stage.
    pipeline_copy: bool = False


_REPLICATED = ParamRole()


def role_of(param: nn.Parameter) -> ParamRole:
    return getattr(param, _ATTR, _REPLICATED)


def set_role(param: nn.Parameter, **changes: bool) -> nn.Parameter:
    """Record ``changes`` (fields of :class:`ParamRole`) on ``param``; returns it."""
    setattr(param, _ATTR, replace(role_of(param), **changes))
    return param


def is_sharded(param: nn.Parameter) -> bool:
    """Holds a tensor-parallel slice of the full parameter."""
    return role_of(param).tp_sharded


def is_tied_across_stages(param: nn.Parameter) -> bool:
    """The embedding of a pipeline's first stage or its copy on the last (tied to the head)."""
    return role_of(param).pipeline_tied


def is_pipeline_copy(param: nn.Parameter) -> bool:
    """A second copy of a parameter another pipeline stage owns (the last stage's tied
    embedding): its gradient is synchronized with the owner's and counted there, once."""
    return role_of(param).pipeline_copy
