"""Step records carry honest times (device drained first), the first step marked warmup, and MFU
from the planner's FLOP count over the device's peak."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict, resolve
from yuanlfa.model import create_model
from yuanlfa.train import throughput, train
from yuanlfa.train.setup import prepare_config
from yuanlfa.train.throughput import StepTimer, device_peak_flops


def _cfg(**train_keys):
    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256},
            "train": {"global_batch_size": 8, "seq_length": 32, **train_keys},
        }
    )
    return resolve(cfg, world_size=1)


def test_mfu_is_six_flops_per_parameter_plus_attention(small_corpus: str) -> None:
    """Against the textbook count (Kaplan et al.: 6 FLOPs per weight per token for a training
    step, plus the attention scores) over the parameters of the model actually built."""
    over = tiny_overrides(small_corpus, train__steps=2, train__peak_tflops=1.0)
    result = train(config_from_dict(over), progress=False)
    first, second = result.records
    assert first["warmup"] is True and "warmup" not in second
    cfg = prepare_config(config_from_dict(over))
    model = create_model(cfg.model, seed=0)
    # Every weight that multiplies a token's activations (not the embedding lookup or the norms'
    # elementwise scales); the head is tied to the embedding, so it is counted once here.
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)
    m, s = cfg.model, cfg.train.seq_length
    attention = m.num_layers * 2 * 2 * s * m.hidden_size * 0.5  # QK^T and AV, causal half
    expected = 3 * (2 * matmul + attention)
    for r in result.records:
        flops_per_token = r["mfu"] * 1e12 / r["tokens_per_s"]
        assert flops_per_token == pytest.approx(expected, rel=1e-9)
        assert r["step_time_s"] > 0


def test_no_mfu_on_cpu_without_a_peak() -> None:
    timer = StepTimer(_cfg(), torch.device("cpu"), world_size=1)
    timer.start()
    assert "mfu" not in timer.stop()


def test_cuda_steps_are_timed_after_a_sync_and_use_the_gpu_peak(monkeypatch) -> None:
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert device_peak_flops(_cfg(), gpu) == 989e12
    # An override wins over the table; an unknown part has no MFU.
    assert device_peak_flops(_cfg(peak_tflops=500.0), gpu) == 500e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA T4")
    assert device_peak_flops(_cfg(), gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    timer = StepTimer(_cfg(), gpu, world_size=4)
    timer.start()
    assert syncs == [gpu]  # queued work from before the step is not charged to it
    record = timer.stop()
    assert syncs == [gpu, gpu]  # the step's kernels finished before the clock stopped
    assert record["step_time_s"] == 2.0 and record["tokens_per_s"] == 8 * 32 / 2.0
    # Four GPUs: four times the peak.
    assert record["mfu"] == pytest.approx(timer.flops_per_token * 128 / (4 * 989e12))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_peak_tflops_must_be_positive(bad: float) -> None:
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        _cfg(peak_tflops=bad)
