"""Islands + DiLoCo in the advisor: link bytes against independent counts, the bandwidth where
the ranking flips, and yuanlfa-plan --advise's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yuanlfa.cli.plan import main
from yuanlfa.config import ConfigError, load_config, resolve
from yuanlfa.layout.traffic import ring_all_reduce_bytes
from yuanlfa.planner import advise, get_device
from yuanlfa.planner.advisor import Layout, apply_layout
from yuanlfa.planner.cost import cost_model
from yuanlfa.planner.islands import (
    Outer,
    advise_islands,
    as_ranked,
    island_cluster,
    island_config,
    islands_link_bytes,
    islands_snippet,
    outer_step_s,
    sync_link_bytes,
)
from yuanlfa.planner.links import Link
from yuanlfa.planner.params import param_counts
from yuanlfa.planner.topology import Cluster

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")
MODEL = ["model.num_layers=8", "model.hidden_size=256", "train.micro_batch_size=2",
         "train.global_batch_size=8"]  # fmt: skip
VOCAB = 262  # the byte tokenizer's
CPU = get_device("cpu")
FLOPS = 2e10  # a sustained CPU rate, so the times are those of a small CPU


def simulated_ring_all_reduce_sent(n: int, elements: int) -> list[int]:
    """Elements each rank sends in a ring all-reduce, by running it: n - 1 reduce-scatter steps
    (rank r sends chunk (r - step) mod n to r + 1), then n - 1 all-gather steps."""
    chunks = [elements // n + (1 if c < elements % n else 0) for c in range(n)]
    sent = [0] * n
    for phase in range(2):
        for step in range(n - 1):
            for r in range(n):
                sent[r] += chunks[(r - step + phase) % n]
    return sent


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_ring_bytes_equal_a_simulated_ring(n: int) -> None:
    elements = 60  # divisible by every n here: every rank sends the same
    sent = simulated_ring_all_reduce_sent(n, elements)
    assert all(s == sent[0] for s in sent)
    assert ring_all_reduce_bytes(4 * elements, n) == pytest.approx(4 * sent[0])


def _advice(inter_gbps: float, nodes: int = 2, gpus: int = 1, overrides: tuple = ()):
    cfg = load_config(TINY, [*MODEL, *overrides])
    cluster = Cluster(nodes, gpus, Link(5.0, 1e-5), Link(inter_gbps, 1e-4))
    advice = advise(cfg, cluster, CPU, top=20, flops_per_s=FLOPS, tokenizer_vocab=VOCAB)
    return cfg, advice


def _total_params(cfg) -> int:
    return param_counts(resolve(cfg, 1, VOCAB).model).total


def test_island_link_bytes_equal_an_independent_count() -> None:
    """2 islands of one device each: an island sends 2 (N - 1) / N of the whole model in fp32
    per sync, 1 / H of it per step; dp across the same link sends (with ZeRO-1, on gloo, whose
    reduce-scatter sends what an all-reduce sends) all of the fp32 gradients and half of the
    weights every step: 1.5 H times as much."""
    cfg, advice = _advice(0.0125)
    ia = advise_islands(
        cfg, advice, CPU, sync_every=(10, 50), fragments=0, flops_per_s=FLOPS,
        tokenizer_vocab=VOCAB,
    )  # fmt: skip
    params = _total_params(cfg)  # one rank holds the whole model (vocab 262 padded to 384)
    for c in ia.islands:
        H = c.outer.sync_every
        assert c.link_bytes_per_step == pytest.approx(4 * params * 2 * (2 - 1) / 2 / H)
    dp = next(s for s in ia.sync if s.label == "dp across the link")
    assert dp.ranked.layout.distributed
    assert dp.link_bytes_per_step == pytest.approx(4 * params + 4 * params / 2)
    pp = next(s for s in ia.sync if s.label == "pp across the link")
    lay, model_cfg, t = pp.ranked.layout, pp.ranked.cfg, pp.ranked.cfg.train
    microbatches = t.global_batch_size // t.micro_batch_size
    activation = 4 * model_cfg.model.hidden_size * t.seq_length * t.micro_batch_size  # fp32
    embedding = model_cfg.model.hidden_size * 384
    assert lay.pp == 2 and model_cfg.model.tie_embeddings
    # On 2 ranks with looped placement every stage boundary joins the two nodes. Per node: one
    # direction of each microbatch's crossing of each boundary, and its end of the tied
    # embedding's gradient sum (a 2-rank ring sends the whole fp32 buffer).
    crossings = lay.pp * lay.virtual_stages - 1
    expected = crossings * microbatches * activation + 4 * embedding
    assert pp.link_bytes_per_step == pytest.approx(expected)


def test_averaged_moments_are_priced_as_two_more_fp32_values_per_parameter() -> None:
    """outer.average_moments both: the pseudo-gradient and both AdamW moments, fp32 each, in
    one exchange: 3 x 4 bytes per parameter; the snippet names the setting."""
    cfg, advice = _advice(0.0125)
    ia = advise_islands(
        cfg, advice, CPU, sync_every=(10,), fragments=2, moments=2, flops_per_s=FLOPS,
        tokenizer_vocab=VOCAB,
    )  # fmt: skip
    params = _total_params(cfg)
    assert ia.islands and all(c.outer.algorithm == "diloco" for c in ia.islands)
    for c in ia.islands:
        assert c.link_bytes_per_step == pytest.approx(12 * params * 2 * (2 - 1) / 2 / 10)
        assert islands_snippet(c)["outer"]["average_moments"] == "both"
    with pytest.raises(ConfigError, match="average_moments"):
        Outer("streaming_diloco", 10, 2, 1, moments=1)


def test_island_bytes_with_pipeline_and_tensor_parallel_islands() -> None:
    """An island of tp2 x pp2: its 4 ranks each exchange their piece; together the whole model
    plus the last stage's copy of the tied embedding plus the replicated weights held twice."""
    cfg, advice = _advice(0.0125, nodes=2, gpus=4)

    island = apply_layout(island_config(cfg, 2), Layout(2, 2, 1), (4, 4), VOCAB)
    options = {"flops_per_s": FLOPS, "mfu": 0.5, "memory_limit_bytes": None}
    ranked = as_ranked(island, (4, 4), island_cluster(advice.cluster, 2), CPU, options)
    counts = param_counts(island.model)
    whole = counts.total + counts.embedding  # the last stage's copy
    replicated = counts.per_layer_replicated * counts.num_layers + counts.final_norm
    expected = 4 * (whole + replicated) * 2 * (3 - 1) / 3 / 10  # tp ranks each hold replicas
    got = islands_link_bytes(ranked.plan, 2, 1, 3, Outer(sync_every=10))
    assert got == pytest.approx(expected)


def test_streaming_without_overlap_is_plain_diloco() -> None:
    def sync(share: float) -> float:
        return 3.0 * share

    plain = outer_step_s(1.0, sync, Outer("diloco", 10))
    assert plain == pytest.approx(1.0 + 3.0 / 10)
    assert outer_step_s(1.0, sync, Outer("streaming_diloco", 10, 4, 0)) == pytest.approx(plain)
    # Each fragment (0.75 s) fits in one step of compute: hidden.
    assert outer_step_s(1.0, sync, Outer("streaming_diloco", 10, 4, 1)) == pytest.approx(1.0)


def _compare(inter_gbps: float) -> tuple[float, float]:
    """(islands with DiLoCo H=50, the best synchronous layout the advisor finds) at a link."""
    cfg, advice = _advice(inter_gbps)
    ia = advise_islands(
        cfg, advice, CPU, sync_every=(50,), fragments=0, flops_per_s=FLOPS,
        tokenizer_vocab=VOCAB, gain=0.1,
    )  # fmt: skip
    return ia.islands[0].step_time_s, advice.best.step_time_s


def test_ranking_flips_at_the_predicted_bandwidth() -> None:
    """The advisor predicts the bandwidth below which 2 islands + DiLoCo H=50 are 10% faster
    than every synchronous layout; a fresh search on either side of it agrees."""
    cfg, advice = _advice(0.0125)
    ia = advise_islands(
        cfg, advice, CPU, sync_every=(50,), fragments=0, flops_per_s=FLOPS,
        tokenizer_vocab=VOCAB, gain=0.1,
    )  # fmt: skip
    (wins,) = ia.crossovers[0].wins
    assert wins[0] is None and wins[1] is not None
    x = wins[1]
    below, above = _compare(0.8 * x), _compare(1.25 * x)
    assert 1.1 * below[0] < below[1]
    assert 1.1 * above[0] > above[1]


def test_sync_link_bytes_none_with_tp_across_nodes() -> None:
    cfg, advice = _advice(0.0125, overrides=("train.global_batch_size=2",))
    r = next(r for r in advice.ranked if "tp" in r.links.crossing)
    model = cost_model(r.cfg, CPU, cluster=advice.cluster, flops_per_s=FLOPS)
    assert sync_link_bytes(model, model.evaluate(r.blocks), advice.cluster) is None


def test_advise_json_has_the_islands(capsys) -> None:
    args = ["--config", TINY, "--advise", "--nodes", "2", "--gpus-per-node", "1",
            "--intra-bw", "5", "--inter-bw", "0.0125", "--device", "cpu", "--top", "3",
            "--sync-every", "10,50", "--flops", str(FLOPS), "--set", *MODEL]  # fmt: skip
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    islands = out["islands"]
    assert {s["label"] for s in islands["sync"]} >= {"pp across the link", "dp across the link"}
    cands = islands["candidates"]
    assert {(c["algorithm"], c["sync_every"]) for c in cands} == {
        (a, h) for a in ("diloco", "streaming_diloco") for h in (10, 50)
    }
    for c in cands:
        assert c["link_bytes_per_step"] > 0 and c["step_time_s"] >= c["inner_step_s"] > 0
        assert c["snippet"]["parallel"]["islands"] == 2
        assert c["snippet"]["outer"]["sync_every"] == c["sync_every"]
        assert isinstance(c["wins"], str) and isinstance(c["wins_now"], bool)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "link MB/step" in text and "DiLoCo H=50" in text and "quality is not modelled" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sync-every", "0"], "--sync-every"),
        (["--sync-every", "ten"], "--sync-every"),
        (["--fragments", "9"], "--fragments"),
        (["--islands-gain", "-1"], "--islands-gain"),
    ],
)
def test_bad_islands_flags(capsys, flags: list[str], message: str) -> None:
    args = ["--config", TINY, "--advise", "--nodes", "2", "--gpus-per-node", "1", "--intra-bw",
            "5", "--inter-bw", "0.0125", "--device", "cpu", "--set", *MODEL]  # fmt: skip
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
