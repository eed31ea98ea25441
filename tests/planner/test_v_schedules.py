"""The planner on the V-shaped schedules (zbv, dualpipev): placement, the tied embedding on one
rank, in-flight microbatches and the simulated bubble from the schedule's spec, and the config
errors that stand for what torch refuses."""

from __future__ import annotations

import pytest

from tests.planner.test_cost import _constant_times, small
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.planner import cost_model, get_device, in_flight_microbatches, simulate, stage_memory

V_SCHEDULES = ("zbv", "dualpipev")


def _makespan(schedule: str, m: int) -> float:
    cfg = small({"virtual_stages": 2, "schedule": schedule}, {"global_batch_size": 2 * m})
    return max(op.end_s for op in simulate(_constant_times(cost_model(cfg)), (1,) * 8))


@pytest.mark.parametrize("schedule", V_SCHEDULES)
def test_v_placement_and_the_tied_embedding_on_rank_zero(schedule: str) -> None:
    blocks = (1, 2, 1, 0, 0, 1, 2, 1)  # uneven, two empty stages at the turn
    cfg = small({"virtual_stages": 2, "schedule": schedule, "pipeline_blocks": list(blocks)})
    model = cost_model(cfg, get_device("H100-SXM"))
    assert [model.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    plan = model.evaluate(blocks)
    static = stage_memory(cfg, 1, blocks, gpu=True)
    assert [r.params for r in plan.ranks] == [s.params for s in static]
    assert [r.layers for r in plan.ranks] == [2, 4, 2, 0]
    # Interleaved, the last stage's rank holds a copy of the tied embedding; V-shaped, rank 0
    # holds both ends and the one matrix: the model's parameters are counted exactly once.
    looped = small({"virtual_stages": 2, "schedule": "interleaved_1f1b"})
    looped_plan = cost_model(looped, get_device("H100-SXM")).evaluate(blocks)
    embedding = 512 * 64
    assert sum(r.params for r in plan.ranks) == sum(r.params for r in looped_plan.ranks) - embedding
    # No tied-embedding gradient sum between ranks.
    assert plan.step_comm_s == 0.0 < looped_plan.step_comm_s


@pytest.mark.parametrize("schedule", V_SCHEDULES)
def test_v_schedules_hold_as_many_microbatches_as_their_order_says(schedule: str) -> None:
    pp, m = 4, 16
    counts = [in_flight_microbatches(schedule, pp, r, m, 2) for r in range(pp)]
    # ZBV keeps 2 * pp (weights released by W); DualPipeV one more; both the same on every
    # rank, unlike interleaved 1F1B, whose first rank holds the most.
    assert counts == [2 * pp + (schedule == "dualpipev")] * pp
    interleaved = [in_flight_microbatches("interleaved_1f1b", pp, r, m, 2) for r in range(pp)]
    assert max(counts) < interleaved[0]


@pytest.mark.parametrize("m", [8, 16])
def test_v_schedules_fill_the_bubble(m: int) -> None:
    interleaved = _makespan("interleaved_1f1b", m)
    busy = m * 3.0 * 2  # F 1 + B 2 per stage and microbatch, two stages per rank
    for schedule in V_SCHEDULES:
        makespan = _makespan(schedule, m)
        assert busy < makespan <= _makespan("zero_bubble", m) < interleaved


def test_v_schedules_need_two_stages_per_rank() -> None:
    for schedule in V_SCHEDULES:
        data = {"model": {"num_layers": 4}, "parallel": {"pp": 2, "schedule": schedule}}
        with pytest.raises(ConfigError, match="virtual_stages: 2") as exc:
            config_from_dict(data)
        assert "\n" not in str(exc.value)


def test_dualpipev_needs_a_microbatch_per_stage() -> None:
    with pytest.raises(ConfigError, match="dualpipev needs at least 8 microbatches") as exc:
        cost_model(small({"virtual_stages": 2, "schedule": "dualpipev"}, {"global_batch_size": 14}))
    assert "\n" not in str(exc.value)
    schedule_spec("dualpipev").check(4, 2, 8)  # enough
    schedule_spec("zbv").check(4, 2, 1)  # torch's ZBV drops the microbatches it lacks


def test_dualpipev_with_data_parallelism_reduces_after_backward() -> None:
    parallel = {"pp": 2, "dp": 2, "virtual_stages": 2, "schedule": "dualpipev"}
    data = {"model": {"num_layers": 4}, "parallel": parallel}
    with pytest.raises(ConfigError, match="overlap_grad_reduce: false") as exc:
        config_from_dict(data)
    assert "\n" not in str(exc.value)
    config_from_dict({**data, "parallel": {**parallel, "overlap_grad_reduce": False}})
    config_from_dict({**data, "parallel": {**parallel, "schedule": "zbv"}})
