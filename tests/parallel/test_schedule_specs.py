"""The schedule specs against torch.distributed.pipelining: each multi-stage spec's operation
order is the one torch's schedule class generates (its ``_calculate_single_rank_operations``,
idle slots dropped), and the V placement is torch's ``generate_stage_to_rank_mapping``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from yuanlfa.layout.ranks import rank_of_stage, stages_of_rank
from yuanlfa.layout.schedules import SCHEDULES, rank_ops

# torch's computation types -> ours (FULL_BACKWARD is B, BACKWARD_INPUT I, BACKWARD_WEIGHT W).
KIND = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}


def _torch_ops(name: str, pp: int, rank: int, m: int, v: int) -> list[tuple[str, int, int]]:
    cls = getattr(torch_schedules, SCHEDULES[name].torch_class)
    rounds = max(1, m // pp)
    fake = SimpleNamespace(
        pp_group_size=pp,
        _n_microbatches=m,
        n_local_stages=v,
        num_stages=pp * v,
        microbatches_per_round=m // rounds,
    )
    out = []
    for action in cls._calculate_single_rank_operations(fake, rank):
        if action is None:
            continue
        parts = action.sub_actions if action.sub_actions else (action,)
        for a in parts:
            out.append((KIND[a.computation_type.name], a.stage_index, a.microbatch_index))
    return out


CASES = [
    ("interleaved_1f1b", 2, 4, 2),
    ("interleaved_1f1b", 4, 8, 2),
    ("interleaved_1f1b", 4, 12, 3),
    ("zero_bubble", 2, 4, 2),
    ("zero_bubble", 4, 8, 2),
    ("zero_bubble", 4, 16, 3),
    ("zbv", 2, 4, 2),
    ("zbv", 2, 3, 2),
    ("zbv", 4, 8, 2),
    ("zbv", 4, 5, 2),
    ("zbv", 3, 12, 2),
    ("dualpipev", 2, 4, 2),
    ("dualpipev", 2, 7, 2),
    ("dualpipev", 4, 8, 2),
    ("dualpipev", 4, 20, 2),
    ("dualpipev", 3, 9, 2),
]


@pytest.mark.parametrize("name,pp,m,v", CASES)
def test_operation_order_is_torchs(name: str, pp: int, m: int, v: int) -> None:
    for rank in range(pp):
        ours = [(op.kind, op.stage, op.microbatch) for op in rank_ops(name, pp, rank, m, v)]
        assert ours == _torch_ops(name, pp, rank, m, v), (name, pp, m, rank)


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_v_placement_is_torchs(pp: int) -> None:
    mapping = generate_stage_to_rank_mapping(pp, 2 * pp, style="v")
    for stage, rank in mapping.items():
        assert rank_of_stage(stage, pp, 2, "v") == rank
        assert stage in stages_of_rank(rank, pp, 2, "v")
    looped = generate_stage_to_rank_mapping(pp, 3 * pp, style="loop")
    for stage, rank in looped.items():
        assert rank_of_stage(stage, pp, 3, "looped") == rank
        assert stage in stages_of_rank(rank, pp, 3, "looped")
