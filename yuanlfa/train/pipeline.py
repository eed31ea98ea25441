"""The trainer's pipeline-parallel pieces: the stage split (``auto`` asks the planner), values
only the last stage holds, evaluation through the pipeline and per-stage statistics."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from yuanlfa.config import Config
from yuanlfa.data.build import get_batch
from yuanlfa.layout import PipelineLayout, build_layout
from yuanlfa.model.transformer import YuanModel
from yuanlfa.parallel.mesh import Mesh
from yuanlfa.parallel.pp.runner import PipelineRunner


def pipeline_layout(cfg: Config, device: torch.device | None = None) -> PipelineLayout:
    """The configured split; ``pipeline_blocks: auto`` asks the balancer for the time-optimal
    split, within the GPU's memory when it is a known preset. Every rank computes the same."""
    auto = None
    if cfg.parallel.pipeline_blocks == "auto":
        from yuanlfa.planner.balance import auto_blocks
        from yuanlfa.planner.devices import device_from_cuda_name

        preset = None
        if device is not None and device.type == "cuda":
            preset = device_from_cuda_name(torch.cuda.get_device_name(device))
        auto = auto_blocks(cfg, preset)
    return build_layout(cfg.parallel, cfg.model, auto)


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def from_last_stage(value: torch.Tensor | None, mesh: Mesh, like: torch.Tensor) -> torch.Tensor:
    """A value only the last stage computes, on every pipeline rank (a sum with zeros)."""
    out = value if value is not None else torch.zeros_like(like)
    dist.all_reduce(out, group=mesh.pp_group)
    return out


@torch.no_grad()
def evaluate_pipeline(
    runner: PipelineRunner,
    model: YuanModel,
    dataset,
    cfg: Config,
    mesh: Mesh,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """Mean per-token loss over the held-out split, run forward-only through the pipeline."""
    model.eval()
    chunk = cfg.train.micro_batch_size * runner.num_microbatches
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(dataset) - chunk + 1, chunk):
        batch = get_batch(dataset, start, chunk, device)
        with autocast():
            loss_sum = runner.eval_loss_sum(batch)
        if loss_sum is not None:
            totals[0] += loss_sum.double()
            totals[1] += batch["loss_mask"].sum()
    model.train()
    totals = from_last_stage(totals, mesh, totals)
    return float(totals[0] / totals[1].clamp(min=1.0))


def stage_stats(
    runner: PipelineRunner, mesh: Mesh, mem_gb: float, device: torch.device
) -> dict[str, list[float]]:
    """Per pipeline rank: compute time of the last step (the rest is bubble and transfers) and
    peak memory, gathered over the pipeline group for the log; with paced ranks also the
    seconds by which ops overran their emulated time (the cores were too busy for the pace)."""
    overrun = runner.pacer.overrun_s if runner.pacer is not None else 0.0
    mine = torch.tensor([runner.busy_s, mem_gb, overrun], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(mesh.pp)]
    dist.all_gather(parts, mine, group=mesh.pp_group)
    out = {
        "stage_busy_s": [round(float(p[0]), 5) for p in parts],
        "stage_mem_gb": [round(float(p[1]), 4) for p in parts],
    }
    if runner.pacer is not None:
        out["stage_overrun_s"] = [round(float(p[2]), 5) for p in parts]
    return out
