"""This rank's pipeline runner from the config: its stage modules and the schedule."""

from __future__ import annotations

import torch

from yuanlfa.config import Config
from yuanlfa.layout import PipelineLayout
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.pp.pacing import Pacer
from yuanlfa.parallel.pp.runner import PipelineRunner
from yuanlfa.parallel.pp.stage import build_stage_modules


def build_runner(
    cfg: Config,
    mesh: Mesh,
    model: YuanModel,
    layout: PipelineLayout,
    device: torch.device,
    num_microbatches: int,
    pacer: Pacer | None = None,
) -> PipelineRunner:
    t, p = cfg.train, cfg.parallel
    modules = build_stage_modules(model, layout, mesh.pp_rank)
    return PipelineRunner(
        modules,
        layout.stages_of_rank(mesh.pp_rank),
        layout,
        mesh.pp_group,
        device,
        schedule=p.schedule,
        num_microbatches=num_microbatches,
        micro_batch_size=t.micro_batch_size,
        seq_length=t.seq_length,
        hidden_size=cfg.model.hidden_size,
        hidden_dtype=next(model.parameters()).dtype,
        seq_shards=p.tp if p.sequence_parallel else 1,
        pacer=pacer,
    )
