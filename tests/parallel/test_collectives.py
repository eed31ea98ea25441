"""Host-side collectives use a device the group's backend supports (NCCL has no CPU backend)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from yuanlfa.parallel.collectives import collective_device


def test_no_group_means_cpu() -> None:
    assert collective_device() == torch.device("cpu")


def test_nccl_groups_get_the_current_cuda_device(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 3)
    # A group with a CPU backend beside NCCL keeps small tensors on the host.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
