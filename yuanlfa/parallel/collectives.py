"""Where the small host-side collectives (agreement flags, step counts, statistics) must live.

NCCL has no CPU backend: a collective on a CPU tensor in an NCCL group fails with "No backend
type associated with device type cpu". Such tensors are therefore made on the device this
function names, never on the CPU by default.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group=None) -> torch.device:
    """The device for a tensor exchanged over ``group`` (the default group when None): the
    current CUDA device when the group's backend has no CPU support, else the CPU."""
    if not dist.is_available() or not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    # "cpu:gloo,cuda:nccl" style groups have both; a plain "nccl" group has no CPU backend.
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
