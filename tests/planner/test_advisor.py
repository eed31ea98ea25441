"""The layout advisor: ranking, memory filter, bounding, the config snippet, and bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from yuanlfa.cli.plan import main
from yuanlfa.config import ConfigError, config_from_dict, load_config, resolve
from yuanlfa.planner import cost_model, get_device
from yuanlfa.planner.advisor import advise, apply_layout, merge, snippet
from yuanlfa.planner.links import Link
from yuanlfa.planner.topology import Cluster

GIB = 2**30
SMALL = {
    "model": {"num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": 512},
    # A split and per-stage recompute for 2 stages, which the snippet must clear.
    "parallel": {"tp": 1, "pp": 2, "pipeline_layout": "Et*2|t*6L"},
    "optim": {"distributed": False},
    "train": {
        "micro_batch_size": 2,
        "global_batch_size": 32,
        "seq_length": 64,
        "precision": "bf16",
        "recompute_stages": ["full", "none"],
    },
}
# Weak inter-node links: 2 nodes of 4 devices, 1 GB/s and 50 us between them.
CLUSTER = Cluster(2, 4, Link(100.0, 2e-6), Link(1.0, 50e-6))
H100 = get_device("H100-SXM")


def small_config():
    return config_from_dict(SMALL)


def test_ranking_is_sorted_fits_and_matches_the_full_list() -> None:
    cfg = small_config()
    full = advise(cfg, CLUSTER, H100, top=10_000)
    times = [r.step_time_s for r in full.ranked]
    assert times == sorted(times) and len(times) > 10
    assert all(r.plan.fits for r in full.ranked)
    for r in full.ranked:
        lay = r.layout
        assert lay.tp * lay.pp * lay.dp == 8
        assert r.cfg.parallel.pipeline_blocks in (None, r.blocks)
        # The listed time is what the cost model gives for that layout and split.
        again = cost_model(r.cfg, H100, cluster=CLUSTER).evaluate(r.blocks).step_time_s
        assert again == pytest.approx(r.step_time_s)
    # Bounding never loses the best ones: the short list is the head of the full one.
    top = advise(cfg, CLUSTER, H100, top=3)
    assert [r.step_time_s for r in top.ranked] == pytest.approx(times[:3])
    assert top.balanced < full.balanced
    # On weak inter-node links the best layout keeps tp inside a node.
    assert "tp" not in top.best.links.crossing


def test_memory_limit_filters() -> None:
    cfg = small_config()
    unlimited = advise(cfg, CLUSTER, H100, top=10_000)
    needs = sorted(r.plan.memory_max_bytes for r in unlimited.ranked)
    limit = needs[len(needs) // 2]  # about half the layouts fit as they are
    tight = advise(cfg, CLUSTER, H100, top=10_000, memory_limit_bytes=limit)
    assert all(r.plan.memory_max_bytes <= limit for r in tight.ranked)
    assert tight.rejected.get("does not fit device memory", 0) > 0
    assert len(tight.ranked) < len(unlimited.ranked)
    assert tight.best.step_time_s >= unlimited.best.step_time_s


def test_snippet_loads_into_the_users_config(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(SMALL))
    advice = advise(load_config(base), CLUSTER, H100, top=5)
    for r in advice.ranked:
        merged = tmp_path / "merged.yaml"
        merged.write_text(yaml.safe_dump(merge(SMALL, snippet(r))))
        cfg = resolve(load_config(merged), 8)
        p, lay = cfg.parallel, r.layout
        assert (p.tp, p.pp, p.dp, p.virtual_stages) == (lay.tp, lay.pp, lay.dp, lay.virtual_stages)
        assert (p.schedule, p.rank_order, p.sequence_parallel) == (
            lay.schedule,
            lay.rank_order,
            lay.sequence_parallel,
        )
        assert cfg.optim.distributed == lay.distributed and cfg.train.recompute == lay.recompute
        if lay.pp > 1:
            assert p.pipeline_blocks == r.blocks
        assert cfg.train.recompute_stages is None and p.pipeline_layout is None


def test_cli_prints_table_and_a_snippet_that_loads(capsys, tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(SMALL))
    args = ["--advise", "--config", str(base), "--nodes", "2", "--gpus-per-node", "4",
            "--intra-bw", "100", "--inter-bw", "1", "--device", "H100-SXM",
            "--top", "4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step s" in out and "inter-node" in out
    text = out.split("best layout, to merge into the config:\n", 1)[1]
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(merge(SMALL, yaml.safe_load(text))))
    resolve(load_config(merged), 8)
    assert main([*args, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    times = [r["step_time_s"] for r in data["ranked"]]
    assert len(times) == 4 and times == sorted(times)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--nodes", "1", "--gpus-per-node", "9", "--intra-bw", "100"], "no valid layout of 9"),
        (["--nodes", "2", "--gpus-per-node", "4", "--intra-bw", "100", "--inter-bw", "0"],
         "--inter-bw: bandwidth must be > 0"),
        (["--nodes", "2", "--gpus-per-node", "4", "--intra-bw", "-5", "--inter-bw", "1"],
         "--intra-bw: bandwidth must be > 0"),
        (["--nodes", "2", "--gpus-per-node", "4", "--intra-bw", "100"], "--inter-bw: needed"),
        (["--gpus-per-node", "4", "--intra-bw", "100"], "--nodes"),
        (["--nodes", "0", "--gpus-per-node", "4", "--intra-bw", "100"], "--nodes: must be >= 1"),
        (["--nodes", "2", "--gpus-per-node", "4", "--intra-bw", "100", "--inter-bw", "1",
          "--memory-limit-gib", "0.001"], "add nodes"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(capsys, tmp_path: Path, extra, needle) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(SMALL))
    assert main(["--advise", "--config", str(base), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_apply_layout_checks_the_interleaved_rounds() -> None:
    cfg = dataclasses.replace(
        small_config(), train=dataclasses.replace(small_config().train, global_batch_size=10)
    )
    from yuanlfa.planner.advisor import Layout

    with pytest.raises(ConfigError, match="multiple of the"):
        # 5 microbatches in rounds of pp = 2: torch refuses the interleaved schedule.
        apply_layout(cfg, Layout(1, 2, 1, 2, "interleaved_1f1b"))
