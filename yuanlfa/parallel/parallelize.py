"""The one entry point from the single-device model to this rank's piece of it."""

from __future__ import annotations

import torch

from yuanlfa.config import Config
from yuanlfa.layout import PipelineLayout
from yuanlfa.model import build_model, materialize
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.pp.stage import stage_flags
from yuanlfa.parallel.pp.tied import mark_tied_embedding
from yuanlfa.parallel.recompute import apply_recompute
from yuanlfa.parallel.tp.plan import apply_tensor_parallel, shard_full_tensor


def parallelize(
    cfg: Config,
    mesh: Mesh,
    device: torch.device,
    layout: PipelineLayout | None = None,
    dtype: torch.dtype = torch.float32,
) -> YuanModel:
    """This rank's model, in four steps applied to the single-device model:

    1. stage selection: the layers of this rank's pipeline stages per ``layout`` (the embedding
       on the first, norm and head on the last), built on the meta device;
    2. tensor (and sequence) parallelism: modules swapped per the tp plan;
    3. materialization: every parameter from the full initial value a single process would use
       (then cut to this rank's shard), so every layout trains the same model;
    4. roles (the tied embedding across stages) and activation recompute.
    """
    m = cfg.model
    layer_ids, has_embedding, has_head = None, True, True
    if layout is not None and mesh.pp > 1:
        layer_ids, has_embedding, has_head = stage_flags(layout, mesh.pp_rank)
    model = build_model(m, layer_ids, has_embedding, has_head)
    shard = None
    if mesh.tp > 1:
        apply_tensor_parallel(
            model, mesh.tp_group, cfg.parallel.sequence_parallel, m.loss_block_size
        )

        def shard(name: str, full: torch.Tensor) -> torch.Tensor:
            return shard_full_tensor(name, full, m, mesh.tp_rank, mesh.tp)

    materialize(model, m, cfg.train.seed, device, dtype, shard=shard)
    mark_tied_embedding(model, mesh)
    stages = (
        [layout.layer_ids(s) for s in layout.stages_of_rank(mesh.pp_rank)] if layer_ids else None
    )
    t = cfg.train
    mode = cfg.train.recompute_of(mesh.pp_rank)
    return apply_recompute(model, mode, t.recompute_method, t.recompute_num_layers, stages)
