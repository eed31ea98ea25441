"""The cost model: its memory parts, its time terms, the schedule simulation, device presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from yuanlfa.config import Config, ConfigError, config_from_dict, load_config, resolve
from yuanlfa.layout import uniform_blocks
from yuanlfa.planner import (
    CostModel,
    cost_model,
    device_from_cuda_name,
    get_device,
    in_flight_microbatches,
    microbatch_activations,
    simulate,
    stage_memory,
)
from yuanlfa.planner.cost import StageTime

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


def small(parallel: dict | None = None, train: dict | None = None, **model) -> Config:
    data = {
        "model": {"num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": 512, **model},
        "parallel": {"pp": 4, "dp": 1, **(parallel or {})},
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 16,
            "seq_length": 32,
            "precision": "bf16",
            **(train or {}),
        },
    }
    cfg = config_from_dict(data)
    p = cfg.parallel
    return resolve(cfg, p.tp * p.pp * p.dp)


def test_static_memory_is_stage_memory() -> None:
    cfg = small(
        {"pipeline_blocks": [1, 2, 3, 2], "dp": 2},
        {"global_batch_size": 32, "param_dtype": "bf16"},
    )
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, distributed=True))
    plan = cost_model(cfg, get_device("A100-40GB")).evaluate((1, 2, 3, 2))
    for rank, static in zip(plan.ranks, stage_memory(cfg, 2, (1, 2, 3, 2), gpu=True)):
        assert rank.params == static.params
        assert (rank.weights_bytes, rank.grads_bytes) == (static.weights_bytes, static.grads_bytes)
        assert rank.optimizer_bytes == static.optimizer_bytes
        # bf16 weights, fp32-accumulated gradients, 12 bytes of fp32 states per parameter
        # sharded over dp=2
        assert rank.weights_bytes == 2 * rank.params
        assert rank.grads_bytes == 4 * rank.params
        assert rank.optimizer_bytes == -(-12 * rank.params // 2)


def test_activation_memory_is_in_flight_times_microbatch_bytes() -> None:
    cfg = small({"pipeline_blocks": [2, 2, 2, 2]})
    model = cost_model(cfg, get_device("H100-SXM"))
    plan = model.evaluate((2, 2, 2, 2))
    m = model.num_microbatches
    assert m == 8
    for r in plan.ranks:
        per_mb = microbatch_activations(cfg.model, model.spec, 2, r.rank == 0, r.rank == 3, 4)
        assert r.in_flight == in_flight_microbatches("1f1b", 4, r.rank, m) == 4 - r.rank
        assert r.activation_bytes == r.in_flight * per_mb.total
        parts = (r.weights_bytes, r.grads_bytes, r.optimizer_bytes, r.activation_bytes)
        assert r.memory_bytes == sum(parts) + r.workspace_bytes
    # The loss workspace (fp32 weight-gradient accumulator of the head) sits on the last rank.
    assert plan.ranks[-1].workspace_bytes >= 4 * 512 * 64
    assert plan.ranks[0].workspace_bytes == 0


def test_gpipe_holds_every_microbatch() -> None:
    one_f_one_b = cost_model(small({"pipeline_blocks": [2, 2, 2, 2]})).evaluate((2, 2, 2, 2))
    gpipe_cfg = small({"pipeline_blocks": [2, 2, 2, 2], "schedule": "gpipe"})
    gpipe = cost_model(gpipe_cfg).evaluate((2, 2, 2, 2))
    assert [r.in_flight for r in gpipe.ranks] == [8] * 4
    assert gpipe.memory_max_bytes > one_f_one_b.memory_max_bytes


def test_recompute_lowers_memory_and_costs_time() -> None:
    blocks = (2, 2, 2, 2)
    plans = {
        mode: cost_model(small(train={"recompute": mode}), get_device("H100-SXM")).evaluate(blocks)
        for mode in ("none", "selective", "full")
    }
    memory = [plans[m].ranks[0].activation_bytes for m in ("none", "selective", "full")]
    time = [plans[m].ranks[0].backward_s for m in ("none", "selective", "full")]
    assert memory[0] > memory[1] > memory[2]
    assert time[0] < time[1] < time[2]
    # Full recompute repeats the forward of every layer.
    layer = {m: cost_model(small(train={"recompute": m})).layer_time() for m in ("none", "full")}
    assert layer["full"].backward_s == pytest.approx(3 * layer["none"].forward_s)
    assert layer["none"].backward_s == pytest.approx(2 * layer["none"].forward_s)


def test_recompute_per_pipeline_rank() -> None:
    cfg = small({"pipeline_blocks": [2, 2, 2, 2]}, {"recompute_stages": ["full"] + ["none"] * 3})
    plan = cost_model(cfg).evaluate((2, 2, 2, 2))
    same = cost_model(small({"pipeline_blocks": [2, 2, 2, 2]})).evaluate((2, 2, 2, 2))
    assert plan.ranks[0].activation_bytes < same.ranks[0].activation_bytes
    assert plan.ranks[0].backward_s > same.ranks[0].backward_s
    assert plan.ranks[1:] == same.ranks[1:]


def test_layer_time_from_flops() -> None:
    cfg = small(train={"seq_length": 64})
    device = get_device("H100-SXM")
    model = cost_model(cfg, device, mfu=0.5)
    h, f, s, tokens = 64, 256, 64, 2 * 64
    # q/k (fused), v, o: 4h^2; LFA's two GEMMs: 2h^2; SwiGLU: 3hf; causal attention: 2sh.
    flops = 2 * (4 * h * h + 2 * h * h + 3 * h * f) + 2 * s * h
    expected = flops * tokens / (device.peak_flops * 0.5)
    assert model.layer_time().forward_s == pytest.approx(expected)
    head = model.stage_time(3, 0)
    assert head.forward_s == pytest.approx(2 * h * 512 * tokens / (device.peak_flops * 0.5))
    # The block-wise loss recomputes its logits in backward.
    assert head.backward_s == pytest.approx(3 * head.forward_s)


def test_links_add_p2p_and_tp_time() -> None:
    fast = cost_model(small(), get_device("H100-SXM"), p2p_gbps=1000.0)
    slow = cost_model(small(), get_device("H100-SXM"), p2p_gbps=1.0)
    boundary = 2 * 64 * 2 * 32  # bf16 [s, b, h]
    middle = slow.stage_time(1, 2).comm_s - fast.stage_time(1, 2).comm_s
    assert middle == pytest.approx(2 * boundary / 1e9 - 2 * boundary / 1e12)
    tp2 = small({"tp": 2, "pp": 2})
    layer = cost_model(tp2, get_device("H100-SXM"), tp_gbps=10.0).layer_time()
    # Five ring all-reduces of [s, b, h] per layer: o_proj and fc2 forward; v_proj, qk_proj and
    # fc1 backward (v_proj and qk_proj read different tensors, x and LF(x)).
    assert layer.comm_s == pytest.approx(5 * 2 * (1 / 2) * boundary / 10e9)
    assert layer.forward_comm_s == pytest.approx(2 * 2 * (1 / 2) * boundary / 10e9)


def _constant_times(model: CostModel) -> CostModel:
    class Constant(CostModel):
        def stage_time(self, stage: int, layers: int) -> StageTime:
            return StageTime(1.0, 2.0, 1.0, 0.0)

    return Constant(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


BUBBLE_CASES = [
    ("gpipe", 1, 8),
    ("1f1b", 1, 8),
    ("1f1b", 1, 3),
    ("interleaved_1f1b", 2, 8),
    ("interleaved_1f1b", 2, 16),
]


@pytest.mark.parametrize("schedule,v,m", BUBBLE_CASES)
def test_simulated_bubble_is_the_textbook_one(schedule: str, v: int, m: int) -> None:
    pp = 4
    cfg = small({"pp": pp, "virtual_stages": v, "schedule": schedule}, {"global_batch_size": 2 * m})
    model = _constant_times(cost_model(cfg))
    makespan = max(op.end_s for op in simulate(model, (1,) * (pp * v)))
    busy = m * 3.0 * v
    assert makespan == pytest.approx(busy * (1 + (pp - 1) / (v * m)))


def test_zero_bubble_fills_the_bubble() -> None:
    cfg = small({"virtual_stages": 2, "schedule": "zero_bubble"})
    interleaved = small({"virtual_stages": 2, "schedule": "interleaved_1f1b"})
    blocks = (1,) * 8
    zb = max(op.end_s for op in simulate(_constant_times(cost_model(cfg)), blocks))
    il = max(op.end_s for op in simulate(_constant_times(cost_model(interleaved)), blocks))
    assert zb < il


def test_plan_bubble_fraction_and_step() -> None:
    model = cost_model(small(), get_device("H100-SXM"), dp_gbps=50.0)
    plan = model.evaluate(uniform_blocks(8, 4))
    m = plan.num_microbatches
    assert plan.pipeline_s >= m * plan.time_max_s
    busy = m * plan.time_max_s
    assert plan.bubble_fraction == pytest.approx((plan.pipeline_s - busy) / busy)
    assert plan.dp_comm_s == 0.0  # dp = 1
    dp2 = small({"dp": 2}, {"global_batch_size": 32})
    plan2 = cost_model(dp2, get_device("H100-SXM"), dp_gbps=50.0).evaluate(uniform_blocks(8, 4))
    assert plan2.dp_comm_s > 0 and plan2.step_time_s == plan2.pipeline_s + plan2.step_comm_s
    assert plan2.step_comm_s >= plan2.dp_comm_s  # + the tied embedding's gradient sum


def test_paper_example_shape() -> None:
    """docs/yuan2_facts.md 6: 24 layers, hidden 6144, 8 stages: uniform stage 1 is the heaviest
    at 78 GB; 2,2,3,3,4,4,4,2 brings stage 1 to 56 GB (about 28% less) and lowers the maximum."""
    cfg = load_config(ROOT / "configs/paper-24l-pp8.yaml")
    cfg = resolve(cfg, 8)
    model = cost_model(cfg, get_device("H100-SXM"))
    uniform = model.evaluate(uniform_blocks(24, 8))
    paper = model.evaluate((2, 2, 3, 3, 4, 4, 4, 2))
    first = [r.memory_bytes for r in uniform.ranks]
    assert first.index(max(first)) == 0
    assert paper.memory_max_bytes < uniform.memory_max_bytes
    assert 70 * GB < uniform.ranks[0].memory_bytes < 86 * GB  # paper: 78 GB
    assert 50 * GB < paper.ranks[0].memory_bytes < 62 * GB  # paper: 56 GB
    saved = 1 - paper.ranks[0].memory_bytes / uniform.ranks[0].memory_bytes
    assert 0.22 < saved < 0.34  # paper: about 28%


def test_device_presets() -> None:
    assert get_device("h100-sxm") is get_device("H100-SXM")
    assert get_device(" a100-80gb ").memory_bytes == 80 * 2**30
    with pytest.raises(ConfigError, match="H100-SXM.*H200"):
        get_device("TPUv5")
    assert device_from_cuda_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert device_from_cuda_name("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert device_from_cuda_name("NVIDIA A100 80GB PCIe").name == "A100-80GB"
    assert device_from_cuda_name("NVIDIA H200").name == "H200"
    assert device_from_cuda_name("Tesla V100-SXM2-32GB").name == "V100-32GB"
    assert device_from_cuda_name("NVIDIA L40S").name == "L40S"
    assert device_from_cuda_name("NVIDIA H100 PCIe") is None
    assert device_from_cuda_name("NVIDIA GeForce RTX 4090") is None


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="mfu"):
        cost_model(small(), mfu=0.0)
    with pytest.raises(ConfigError, match="p2p_gbps"):
        cost_model(small(), p2p_gbps=-1.0)
    with pytest.raises(ConfigError, match="num_layers"):
        cost_model(small()).evaluate((1, 1, 1, 1))
