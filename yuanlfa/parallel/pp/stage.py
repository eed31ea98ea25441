"""Pipeline stages as views over this rank's model.

A rank builds ONE model (a :class:`YuanModel` holding the layers of all its virtual stages, the
embedding on the first stage, the final norm and head on the last) so parameters keep their
global names for the optimizer and checkpoints. Each stage is a :class:`StageModule` that
registers only the modules that stage runs, so ``stage.parameters()`` is exactly that stage's
weights (what torch's zero-bubble schedules differentiate separately).
"""

from __future__ import annotations

import torch
from torch import nn

from yuanlfa.layout import PipelineLayout
from yuanlfa.model.transformer import YuanModel


class StageModule(nn.Module):
    """One pipeline stage. forward(x, position_ids, labels):

    x is the token ids [b, s] on the first stage, else the previous stage's hidden [s, b, h];
    returns the hidden [s, b, h], or on the last stage the per-token fp32 losses [b, s].
    """

    def __init__(self, model: YuanModel, layer_ids: list[int], is_first: bool, is_last: bool):
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.layer_keys = [str(i) for i in layer_ids]
        self.layers = nn.ModuleDict({k: model.layers[k] for k in self.layer_keys})
        if is_first or (is_last and model.cfg.tie_embeddings):
            self.embed = model.embed
        if is_last:
            self.final_norm = model.final_norm
            self.lm_head = model.lm_head
            if model.output is not None:
                self.output = model.output
        # Held in a list so the whole model is not registered (its other stages' parameters
        # must not count as this stage's).
        self._model = [model]

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model = self._model[0]
        hidden = model.embed_tokens(x) if self.is_first else x
        hidden = model.run_layers(hidden, position_ids, self.layer_keys)
        if not self.is_last:
            return hidden
        return model.head_forward(hidden, labels)


def stage_flags(layout: PipelineLayout, pp_rank: int) -> tuple[list[int], bool, bool]:
    """(layer ids, holds the embedding, holds the head) of everything pipeline rank runs."""
    stages = layout.stages_of_rank(pp_rank)
    layer_ids = [i for s in stages for i in layout.layer_ids(s)]
    return layer_ids, 0 in stages, layout.num_stages - 1 in stages


def build_stage_modules(
    model: YuanModel, layout: PipelineLayout, pp_rank: int
) -> list[StageModule]:
    return [
        StageModule(model, layout.layer_ids(s), layout.is_first(s), layout.is_last(s))
        for s in layout.stages_of_rank(pp_rank)
    ]
