"""The advisor and yuanlfa-plan on heterogeneous clusters: fits per device, tp inside one kind,
agreement with the homogeneous advisor on a uniform cluster, a snippet that loads, and bad
input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from yuanlfa.cli.plan import main
from yuanlfa.config import ConfigError, config_from_dict, load_config, resolve
from yuanlfa.planner.advisor import advise, merge, snippet
from yuanlfa.planner.advisor_mixed import advise_mixed, stage_table
from yuanlfa.planner.cluster import mixed_cluster, tp_mixed
from yuanlfa.planner.devices import get_device
from yuanlfa.planner.links import Link
from yuanlfa.planner.topology import Cluster

from .test_advisor import SMALL

GIB = 2**30


def mixed(*groups, inter: float = 1.0) -> dict:
    return {
        "groups": [{"device": d, "nodes": 1, "devices_per_node": 4, **x} for d, x in groups],
        "inter_gbps": inter,
        "inter_latency_us": 50.0,
        "intra_latency_us": 2.0,
    }


FAST = ("fast", {"memory_gib": 80, "tflops": 900, "intra_gbps": 100})
SLOW = ("slow", {"memory_gib": 40, "tflops": 300, "intra_gbps": 100})


def with_cluster(cluster: dict):
    return config_from_dict({**SMALL, "cluster": cluster})


def test_uniform_cluster_agrees_with_the_homogeneous_advisor() -> None:
    cfg = with_cluster(mixed(FAST, FAST))
    ours = advise_mixed(cfg, mixed_cluster(cfg.cluster), top=3)
    device = mixed_cluster(cfg.cluster).groups[0].device
    flat = Cluster(2, 4, Link(100.0, 2e-6), Link(1.0, 50e-6))
    theirs = advise(dataclasses.replace(cfg, cluster=type(cfg.cluster)()), flat, device, top=3)
    assert ours.best.step_time_s == pytest.approx(theirs.best.step_time_s, rel=1e-9)


def test_mixed_plans_fit_each_device_and_keep_tp_in_one_kind(tmp_path: Path) -> None:
    cfg = with_cluster(mixed(FAST, SLOW))
    cluster = mixed_cluster(cfg.cluster)
    advice = advise_mixed(cfg, cluster, top=8)
    assert advice.rejected.get("tp across nodes or device kinds", 0) > 0
    for r in advice.ranked:
        lay = r.layout
        ordered = cluster.reordered(lay.groups)
        assert not tp_mixed(ordered, lay.tp, lay.pp, lay.dp, lay.rank_order)
        assert r.plan.fits
        for row in stage_table(r):
            assert row["memory_gib"] <= row["limit_gib"]
        # The snippet, merged into the user's config, loads and gives this layout and devices.
        merged = tmp_path / "merged.yaml"
        merged.write_text(yaml.safe_dump(merge(SMALL, snippet(r))))
        loaded = resolve(load_config(merged), 8)
        assert loaded.parallel.pipeline_blocks == (r.blocks if lay.pp > 1 else None)
        assert len(loaded.train.recompute_stages) == lay.pp
        assert [g.device for g in loaded.cluster.groups] == [
            cfg.cluster.groups[i].device for i in lay.groups
        ]
    # Slow devices get less work per pipeline rank than fast ones when a pipeline spans both.
    best = advice.best
    rows = stage_table(best)
    if best.layout.pp > 1 and len({row["device"] for row in rows}) > 1:
        fast = [row["layers"] for row in rows if row["device"] == "fast"]
        slow = [row["layers"] for row in rows if row["device"] == "slow"]
        assert sum(slow) / len(slow) < sum(fast) / len(fast)


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_cluster_file_plan_and_advise(capsys, tmp_path: Path) -> None:
    base = {**SMALL, "parallel": {"pp": 4, "pipeline_blocks": "auto"}}
    base["train"] = {**SMALL["train"], "recompute_stages": None}
    config = write(tmp_path, "base.yaml", base)
    cluster = write(tmp_path, "cluster.yaml", {"cluster": mixed(FAST, SLOW)})
    assert main(["--config", config, "--cluster", cluster, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    aware = out["aware"]
    assert aware["fits"] and len(aware["ranks"]) == 4 and sum(aware["blocks"]) == 8
    assert [r["device"] for r in aware["ranks"]] == ["fast", "fast", "slow", "slow"]
    # The balancer's objective (slowest rank per microbatch), not the simulated step.
    assert aware["time_max_s"] <= out["uniform"]["time_max_s"]
    png = tmp_path / "plans.png"
    assert main(["--config", config, "--cluster", cluster, "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "aware blocks:" in text and "limit GiB" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written" in text
    assert main(["--config", config, "--cluster", cluster, "--advise", "--top", "3"]) == 0
    text = capsys.readouterr().out
    snippet_text = text.split("to merge into the config:\n", 1)[1]
    merged = write(tmp_path, "merged.yaml", merge(base, yaml.safe_load(snippet_text)))
    assert resolve(load_config(merged), 8).cluster.world_size == 8


@pytest.mark.parametrize(
    "cluster,sets,message",
    [
        (mixed(("h100-81g", {}), FAST), [], "cluster.groups[0].device: 'h100-81g' is not a known"),
        (mixed(FAST, SLOW), ["parallel.dp=8"], "= 16; set parallel.dp=4"),
        (mixed(FAST), ["parallel.pp=3"], "not a multiple of tp * pp * cp = 3"),
        # One-device flags a cluster plan has no use for are refused, not ignored.
        (mixed(FAST), ["--objective", "time"], "--objective do not apply to a cluster"),
        (mixed(FAST), ["--p2p-gbps", "3", "--flops", "1e12"], "--flops / --p2p-gbps do not"),
        (mixed(FAST), ["--memory-limit-gib", "9"], "--memory-limit-gib without --advise"),
    ],
)
def test_cli_bad_cluster_is_one_line(capsys, tmp_path: Path, cluster, sets, message) -> None:
    base = {**SMALL, "parallel": {"pp": 2, "pipeline_blocks": "auto"}}
    base["train"] = {**SMALL["train"], "recompute_stages": None}
    config = write(tmp_path, "base.yaml", base)
    path = write(tmp_path, "cluster.yaml", cluster)
    flags = [a for a in sets if "=" not in a]
    sets = [a for a in sets if "=" in a]
    assert main(["--config", config, "--cluster", path, *flags, *(["--set", *sets] if sets else [])]
                ) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_cli_missing_cluster_file(capsys, tmp_path: Path) -> None:
    config = write(tmp_path, "base.yaml", SMALL)
    assert main(["--config", config, "--cluster", str(tmp_path / "none.yaml")]) == 2
    assert "--cluster" in capsys.readouterr().err


def test_unused_device_presets() -> None:
    assert get_device("a100-80g").memory_bytes == 80 * GIB
    assert get_device("l40s-48g").name == "L40S"


def test_nothing_fits_names_the_closest_layout() -> None:
    tiny = ("tiny", {"memory_gib": 0.0015, "tflops": 300, "intra_gbps": 100})
    cfg = with_cluster(mixed(tiny, tiny))
    with pytest.raises(ConfigError) as err:
        advise_mixed(cfg, mixed_cluster(cfg.cluster), top=3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no layout of 8 layers fits 1 x 4 tiny + 1 x 4 tiny")
    assert "the closest, tp" in message and "MiB of layer state more" in message
