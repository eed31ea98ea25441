"""Measure the activations autograd keeps for backward: live bytes and their peak.

Used to check the planner's activation model against what a pipeline stage really holds
(tests/parallel/test_activation_memory.py) and for ad-hoc memory studies. Tensors sharing a
storage are counted once. Tensors that live anyway (parameters, the input batch, and views of
them) are not activations held for backward: pass them as ``exclude``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


class _Saved:
    """What the graph holds instead of a saved tensor; its death releases the bytes."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedActivationProbe:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.live = 0
        self.peak = 0
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or tensor.device.type == "meta":
            return tensor
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        # Hold a detached alias (same storage): holding the tensor itself closes a cycle
        # through C++ (tensor -> its grad_fn -> this packed object -> tensor) that Python's
        # collector cannot see; a graph kept with retain_graph, as the split backward of
        # zbv / dualpipev keeps its input-gradient part, then never died and its bytes were
        # counted to the end of the run.
        saved = _Saved(tensor.detach())
        weakref.finalize(saved, self._release, key)
        return saved

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    @staticmethod
    def _unpack(saved: object) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def __enter__(self) -> SavedActivationProbe:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
