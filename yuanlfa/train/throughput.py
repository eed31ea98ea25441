"""Honest step times and model FLOPs utilization (MFU) for the step records.

A CUDA step only queues kernels: the host clock stops long before the GPU finishes unless the
device is synchronized first, so :class:`StepTimer` synchronizes at both ends of a step. MFU is
the model's training FLOPs per token (the planner's count: forward + 2x backward, recompute not
included, as in the PaLM/Megatron definition) times tokens/s over the peak of every device.
"""

from __future__ import annotations

import time

import torch

from yuanlfa.config import Config, ConfigError
from yuanlfa.planner.devices import device_from_cuda_name
from yuanlfa.planner.flops import flops_per_token


def device_peak_flops(cfg: Config, device: torch.device) -> float | None:
    """Peak dense FLOP/s of one device: ``train.peak_tflops`` when set, else the datasheet
    figure of a known GPU; None (no MFU) on a CPU or an unknown GPU."""
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    preset = device_from_cuda_name(torch.cuda.get_device_name(device))
    return preset.peak_flops if preset is not None else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time of one optimizer step with the device drained at both ends, tokens/s and MFU.

    The first step a process runs is marked ``warmup`` (Triton/cuBLAS compilation and the
    allocator's first growth land in it), so averages can leave it out."""

    def __init__(self, cfg: Config, device: torch.device, world_size: int) -> None:
        self.device = device
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        peak = device_peak_flops(cfg, device)
        self.peak = peak * world_size if peak is not None else None
        try:
            self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_length)["train"]
        except ConfigError:
            # A plug-in filter or attention whose costs were not declared to the planner
            # (yuanlfa-info does that): no model FLOPs, so no mfu.
            self.peak = None
        self.first = True
        self.started = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> dict[str, float | bool]:
        """The timing fields of the step record: step_time_s, tokens_per_s, mfu (with a known
        peak) and warmup (first step of this process only)."""
        synchronize(self.device)
        elapsed = time.perf_counter() - self.started
        tokens_per_s = self.tokens_per_step / elapsed
        out: dict[str, float | bool] = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed}
        if self.peak is not None:
            out["mfu"] = self.flops_per_token * tokens_per_s / self.peak
        if self.first:
            out["warmup"] = True
            self.first = False
        return out
