"""Attention dropout whose masks do not depend on the layout.

The mask of one (step, sample, layer, head) is drawn from its own generator, seeded from
(train.seed, step, the sample's global index in the dataset, layer, global head): a tp rank
holding heads 8..15 draws exactly the masks one process draws for those heads, a dp rank's
samples and a pipeline stage's layers likewise, and a recomputed forward (activation recompute)
draws the same mask again.

The trainer says which samples a step's microbatches hold by setting a :class:`DropoutStep`
(:func:`dropout_step`) around the step; the model reads it once per microbatch and stage
(``YuanModel.run_layers``) and hands the resulting :class:`DropoutKey` down to the attention as
an argument, so a checkpointed layer recomputed in backward sees the key of its own microbatch.
With flash-attn on CUDA the fused kernel draws the masks instead (no score matrix kept): seeded
per (step, sample, layer, first head of the rank), so the same for every pp and dp layout and on
recompute, but flash-attn numbers heads locally, so its masks change with tp.
Nothing here knows about process groups. Without a DropoutStep (a model trained outside the
Trainer) the key comes from torch's global generator: reproducible under torch.manual_seed, but
tied to the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from yuanlfa.model.seeds import name_seed


@dataclass
class DropoutStep:
    """What one optimizer step's dropout masks are drawn from, on this rank.

    ``samples``: the global dataset indices of this rank's share of the step's batch, in the
    order its microbatches run (``micro_batch_size`` each).
    """

    seed: int
    step: int
    samples: tuple[int, ...]
    micro_batch_size: int
    # Microbatches each pipeline stage has run this step: every schedule runs a stage's
    # forwards in microbatch order, so the n-th training forward of a stage is microbatch n.
    _next: dict[str, int] = field(default_factory=dict)

    def next_microbatch(self, stage: str) -> tuple[int, ...]:
        """The samples of ``stage``'s next microbatch (stage: any name fixed per stage)."""
        m = self._next.get(stage, 0)
        lo = m * self.micro_batch_size
        if lo + self.micro_batch_size > len(self.samples):
            raise RuntimeError(
                f"stage {stage} ran more than {len(self.samples) // self.micro_batch_size} "
                "training forwards in one step; set the DropoutStep once per optimizer step"
            )
        self._next[stage] = m + 1
        return self.samples[lo : lo + self.micro_batch_size]


_CURRENT: list[DropoutStep | None] = [None]


@contextlib.contextmanager
def dropout_step(state: DropoutStep) -> Iterator[DropoutStep]:
    """Make ``state`` the current step for the model's attention dropout."""
    previous = _CURRENT[0]
    _CURRENT[0] = state
    try:
        yield state
    finally:
        _CURRENT[0] = previous


@dataclass(frozen=True)
class DropoutKey:
    """One microbatch's dropout: probability ``p`` and what its masks are seeded from."""

    p: float
    seed: int
    step: int
    samples: tuple[int, ...]

    def keep_mask(
        self, layer: int, head_offset: int, heads: int, shape: tuple[int, int], device
    ) -> torch.Tensor:
        """bool [b, heads, s, kv]: True where the probability is kept, for the global heads
        head_offset .. head_offset + heads - 1 of ``layer``."""
        rows = []
        for sample in self.samples:
            per_head = []
            for h in range(head_offset, head_offset + heads):
                gen = torch.Generator(device=device)
                gen.manual_seed(name_seed(self.seed, f"attn-drop:{self.step}:{sample}:{layer}:{h}"))
                per_head.append(torch.rand(shape, generator=gen, device=device) >= self.p)
            rows.append(torch.stack(per_head))
        return torch.stack(rows)


def microbatch_key(p: float, stage: str, batch: int) -> DropoutKey:
    """The key of the microbatch about to run on ``stage`` (``batch`` samples)."""
    state = _CURRENT[0]
    if state is None:
        seed = int(torch.randint(0, 2**62, (1,)))
        return DropoutKey(p, seed, 0, tuple(range(batch)))
    samples = state.next_microbatch(stage)
    if len(samples) != batch:
        raise RuntimeError(f"the DropoutStep gives {len(samples)} samples, the batch has {batch}")
    return DropoutKey(p, state.seed, state.step, samples)


@dataclass(frozen=True)
class LayerDropout:
    """A DropoutKey bound to one layer and this rank's heads: what the core attention needs."""

    key: DropoutKey
    layer: int
    head_offset: int

    @property
    def p(self) -> float:
        return self.key.p

    def keep_mask(self, heads: int, shape: tuple[int, int], device) -> torch.Tensor:
        return self.key.keep_mask(self.layer, self.head_offset, heads, shape, device)

    def sample_seed(self, index: int) -> int:
        """The seed of the ``index``-th sample's masks for this rank's heads (the fused
        flash-attn path, which draws all of a call's heads from one generator)."""
        k = self.key
        sample = k.samples[index]
        return name_seed(k.seed, f"attn-drop:{k.step}:{sample}:{self.layer}:from{self.head_offset}")
