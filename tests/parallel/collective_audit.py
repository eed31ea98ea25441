"""Find every tensor that reaches a torch.distributed collective on a CPU it was never asked for.

NCCL has no CPU backend, so a collective on a tensor the code left on the CPU by default (a
``torch.tensor([...])`` without ``device=``, a ``.cpu()``) crashes every multi-GPU run, while
gloo, the only backend a CPU test has, accepts it. To see the difference without a GPU, the run
device and :func:`~yuanlfa.parallel.collectives.collective_device` are replaced by
:data:`SENTINEL`, ``cpu:0``: a CPU device (gloo works) that no code names by accident. A
:class:`torch.overrides.TorchFunctionMode` follows where each tensor's device came from:

- a factory (``torch.tensor``, ``zeros``, ...) or ``.to``/``empty_like`` with ``device=SENTINEL``:
  placed deliberately;
- a factory without ``device=`` or with any other device, or ``.cpu()``: defaulted;
- ``t.device`` is ``SENTINEL`` for a deliberately placed tensor (as it would be ``cuda:0``), plain
  ``cpu`` for a defaulted one, so code that places a tensor where another one is inherits its mark;
- any other op: its output is on the device of its (non-scalar) inputs, so it inherits their
  mark; an in-place op keeps its destination's device, so it keeps its destination's mark.

Tensors the autograd engine makes (gradients) are never marked: they follow their parameters.
Every collective in ``torch.distributed`` (and the aliases yuanlfa binds at import) is wrapped to
record, per call, the yuanlfa function that issued it and whether a defaulted tensor reached it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten

import yuanlfa.train.trainer
from yuanlfa.parallel.collectives import collective_device as _REAL_COLLECTIVE_DEVICE

SENTINEL = torch.device("cpu", 0)
_DEVICE_GET = torch._C.TensorBase.device.__get__


def _device(t: torch.Tensor) -> torch.device:
    """``Tensor.device`` during the audit: as on a GPU, a tensor on the chosen device says so,
    so code that follows a tensor (device=t.device) places deliberately unless that tensor was
    defaulted."""
    real = _DEVICE_GET(t)
    if real.type == "cpu" and not getattr(t, _MARK, False):
        return SENTINEL
    return real


_MARK = "_audit_defaulted_device"
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "send",
    "recv",
    # Not isend/irecv: P2POp checks their identity; the pipeline batches them through here.
    "batch_isend_irecv",
)
# Modules that bound a collective to a name of their own at import.
_ALIASES = (
    ("yuanlfa.parallel.tp.comm", "_reduce_scatter"),
    ("yuanlfa.parallel.dp.reducer", "_reduce_scatter"),
)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _explicit(dev) -> bool:
    """Whether a device argument names the sentinel (deliberate) rather than anything else."""
    return torch.device(dev) == SENTINEL


def _to_device(args, kwargs):
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return a
    return None


def _in_place(name: str) -> bool:
    if name.startswith("__"):
        return name.startswith("__i") and name.endswith("__") or name == "__setitem__"
    return name.endswith("_")


class _DeviceOrigin(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.constructors = _device_constructors() | {torch.from_numpy, torch.frombuffer}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func is torch.Tensor.to and _to_device(args, kwargs) is not None:
            defaulted = not _explicit(_to_device(args, kwargs))
        elif kwargs.get("device") is not None:
            defaulted = not _explicit(kwargs["device"])
        elif func in self.constructors or func is torch.Tensor.cpu:
            defaulted = True
        elif _in_place(name) or "out" in kwargs:
            return out  # in place: the destination keeps its device and its mark
        else:
            inputs = _tensors((args, kwargs))
            deciding = [t for t in inputs if t.dim() > 0] or inputs
            defaulted = any(getattr(t, _MARK, False) for t in deciding)
        for t in _tensors(out):
            with contextlib.suppress(AttributeError, RuntimeError):
                setattr(t, _MARK, defaulted)
        return out


@dataclass
class Audit:
    """calls: (issuing yuanlfa function, collective name) per call; offenders: the stack of each
    call that received a defaulted tensor."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    offenders: list[str] = field(default_factory=list)

    @property
    def callers(self) -> set[str]:
        return {caller for caller, _ in self.calls}


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/yuanlfa/" in frame.filename:
            return frame.name
    return "?"


def _wrap(audit: Audit, name: str, fn):
    def wrapped(*args, **kwargs):
        tensors = _tensors((args, kwargs))
        if name == "batch_isend_irecv":
            tensors = [op.tensor for op in args[0]]
        audit.calls.append((_caller(), name))
        if any(getattr(t, _MARK, False) for t in tensors):
            audit.offenders.append(f"{name}:\n" + "".join(traceback.format_stack()[-8:-1]))
        return fn(*args, **kwargs)

    return wrapped


def _patch(monkeypatch: pytest.MonkeyPatch, audit: Audit) -> None:
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, _wrap(audit, name, getattr(dist, name)))
    for module, attr in _ALIASES:
        mod = importlib.import_module(module)
        monkeypatch.setattr(mod, attr, _wrap(audit, attr, getattr(mod, attr)))
    # Every module that imported collective_device (the checkpoint loader, the async saver...).
    users = [m for n, m in sys.modules.items() if n.startswith("yuanlfa") and m is not None]
    for mod in users:
        if getattr(mod, "collective_device", None) is _REAL_COLLECTIVE_DEVICE:
            monkeypatch.setattr(mod, "collective_device", lambda group=None: SENTINEL)
    monkeypatch.setattr(yuanlfa.train.trainer, "pick_device", lambda cfg: SENTINEL)
    monkeypatch.setattr(torch.Tensor, "device", property(_device))


@contextlib.contextmanager
def audit_collectives() -> Iterator[Audit]:
    """Within the block: the run device and collective_device() are :data:`SENTINEL`, and every
    collective records into the yielded :class:`Audit`."""
    audit = Audit()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _patch(monkeypatch, audit)
        with _DeviceOrigin():
            yield audit
