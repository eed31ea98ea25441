"""No collective of a training run gets a tensor left on the CPU by default (NCCL would refuse
it: "No backend type associated with device type cpu"): training steps, stage statistics,
evaluation, saving, resuming and checkpoint.init_from, under pipeline, data (sharded optimizer)
and tensor (sequence) parallelism.

See collective_audit for how a gloo run tells a deliberately placed tensor from a defaulted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.parallel.collective_audit import SENTINEL, audit_collectives
from tests.tiny import tiny_overrides
from yuanlfa.config import config_from_dict

LAYOUTS = {
    "pp2": {"parallel__pp": 2},
    "dp2_sharded": {"optim__distributed": True},
    "tp2_sp": {"parallel__tp": 2, "parallel__sequence_parallel": True},
}


def _train(corpus: str, layout: str, **extra) -> None:
    from yuanlfa.train import train

    keys = {"train__steps": 3, "train__global_batch_size": 4, "train__micro_batch_size": 2}
    over = tiny_overrides(corpus, **{**keys, **LAYOUTS[layout], **extra})
    train(config_from_dict(over), progress=False)


def _rank(rank: int, world: int, corpus: str, layout: str, root: str) -> dict:
    ckpt, other = str(Path(root) / "ckpt"), str(Path(root) / "other")
    with audit_collectives() as audit:
        # Exits after saving step 2 (an eval first); the resumed run does the last step.
        _train(corpus, layout, checkpoint__dir=ckpt, train__exit_interval=2)
        _train(corpus, layout, checkpoint__dir=ckpt, checkpoint__resume=True)
        _train(corpus, layout, checkpoint__dir=other, checkpoint__init_from=ckpt)
    return {"callers": audit.callers, "offenders": audit.offenders}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_collectives_get_tensors_on_the_chosen_device(
    small_corpus: str, tmp_path: Path, layout: str
) -> None:
    results = run_distributed(_rank, 2, small_corpus, layout, str(tmp_path), timeout=600)
    for rank, r in enumerate(results):
        assert not r["offenders"], f"rank {rank}:\n" + "\n".join(r["offenders"])
    callers = set().union(*(r["callers"] for r in results))
    # The audit saw the places that exchange host-side values: the resume agreement, the
    # checkpoint load's agreement (resume and init_from), per-step sums and norms, and under pp
    # the stage statistics and the pipeline evaluation.
    assert {"_resume", "_agree", "sum_over"} <= callers, callers
    if layout == "pp2":
        assert {"stage_stats", "from_last_stage"} <= callers, callers


def test_the_audit_catches_a_tensor_left_on_the_cpu(tmp_path: Path) -> None:
    """The old checkpoint agreement, torch.tensor([...]) without a device, is caught; the same
    tensor on the chosen device is not."""
    run_distributed(_catches, 2)


def _catches(rank: int, world: int) -> None:
    import torch.distributed as dist

    with audit_collectives() as audit:
        dist.all_reduce(torch.tensor([1], device=SENTINEL))
        dist.all_reduce(torch.zeros(2, device=SENTINEL).sum() + 1)
        assert not audit.offenders
        dist.all_reduce(torch.tensor([1]))
        assert len(audit.offenders) == 1
        dist.all_reduce(torch.tensor([1], device="cpu") * 2)
        dist.all_reduce(torch.ones(3, device=SENTINEL).cpu())
        assert len(audit.offenders) == 3
