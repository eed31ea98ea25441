"""bf16 only where the GPU has bf16 tensor cores; the gradient norm and clipping as torch's
clip_grad_norm_ computes them (now one multi-tensor kernel each); the sharded optimizer's master
step honours optim.fused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from yuanlfa.config import ConfigError, OptimConfig, config_from_dict
from yuanlfa.parallel.dp.zero import ShardedAdamW
from yuanlfa.parallel.grads import clip_grads, global_grad_norm
from yuanlfa.train.setup import pick_precision

GPU = torch.device("cuda", 0)


def _cfg(**train):
    return config_from_dict({"train": train})


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device as pick_precision sees it; ``gpu(native)`` sets its bf16 support."""

    def make(native: bool, name: str) -> torch.device:
        calls = []

        def supported(including_emulation: bool = True) -> bool:
            calls.append(including_emulation)
            return native or including_emulation  # torch's default also counts emulation

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return GPU

    return make


def test_bf16_on_gpus_with_bf16_tensor_cores(gpu) -> None:
    device = gpu(True, "NVIDIA H100 80GB HBM3")
    assert pick_precision(_cfg(), device) == torch.bfloat16
    assert pick_precision(_cfg(precision="fp32"), device) == torch.float32


def test_fp32_or_a_clear_error_without_them(gpu) -> None:
    device = gpu(False, "Tesla V100-SXM2-32GB")
    with pytest.warns(UserWarning, match="V100.*no bf16 tensor cores"):
        assert pick_precision(_cfg(), device) == torch.float32
    for key in ("precision", "param_dtype"):
        with pytest.raises(ConfigError, match=f"train.{key}: bf16 needs .*V100"):
            pick_precision(_cfg(**{key: "bf16"}), device)


def test_cpu_keeps_fp32_by_default_and_bf16_on_request() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_precision(_cfg(), torch.device("cpu")) == torch.float32
        assert pick_precision(_cfg(precision="bf16"), torch.device("cpu")) == torch.bfloat16


def _grads(dtype=torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in [(7, 5), (5,), (3, 4, 2), (1,)]:
        p = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype) * 3
        params.append(p)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_clipping_equal_torchs_clip_grad_norm(dtype) -> None:
    ours, theirs = _grads(dtype), _grads(dtype)
    norm = global_grad_norm(ours)
    clip_grads(ours, 1.0, norm)
    # torch's reference in fp32 (for bf16 gradients ours accumulates in fp32 as well).
    ref = nn.utils.get_total_norm([p.grad.float() for p in theirs], foreach=False)
    assert norm == pytest.approx(float(ref), rel=1e-6)
    nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0
        )


def _sharded_step(fused: bool | None) -> tuple[ShardedAdamW, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    opt = ShardedAdamW(model, OptimConfig(lr=1e-2, fused=fused), None, shard=False)
    for _ in range(3):
        opt.start_step(1)
        model(torch.randn(5, 6)).square().sum().backward()
        opt.reduce_gradients()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


def test_sharded_optimizer_honours_optim_fused() -> None:
    fused, a = _sharded_step(True)
    plain, b = _sharded_step(None)
    assert all(g["fused"] for g in fused.inner.param_groups)
    assert not any(g["fused"] for g in plain.inner.param_groups)  # CPU default: foreach
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
