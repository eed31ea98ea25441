"""Islands joined by DiLoCo / Streaming DiLoCo (yuanlfa.parallel.islands): the correctness
anchors of docs/islands.md.

- 1 island with DiLoCo (outer lr 1, momentum 0) equals the plain run;
- 2 islands with ``outer.algorithm: none`` equal dp = 2;
- the outer step equals DiLoCo's update computed directly (torch.optim.SGD on a copy) from the
  gathered parameters of every island, for DiLoCo and for Streaming DiLoCo's staggered, delayed
  fragments;
- a multi-island DiLoCo run saved mid-way (an exchange in flight) and resumed equals the
  uninterrupted run, and its islands agree after a synchronization;
- an exchange round (quorum, sums, commit) applies the outer step only on commit, and a healed
  island continues from the live island's step inside its round (fake exchanges; the real
  torchft path: test_islands_fault.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.checkpoint.files import step_name
from yuanlfa.config import ConfigError, OuterConfig, ParallelConfig, config_from_dict
from yuanlfa.layout.traffic import ring_all_reduce_bytes
from yuanlfa.parallel import build_mesh
from yuanlfa.parallel.islands import GroupExchange, OuterSync
from yuanlfa.train import train

STEPS = 10


def _losses(corpus: str, **extra: object) -> list[tuple[float, float, int | None]]:
    cfg = tiny_overrides(corpus, train__steps=STEPS, train__micro_batch_size=2, **extra)
    records = train(config_from_dict(cfg), progress=False).records
    return [(r["loss"], r["grad_norm"], r.get("link_bytes")) for r in records]


def _anchor_runs(rank: int, world: int, corpus: str) -> dict[str, list]:
    return {
        "plain dp2": _losses(corpus),
        "1 island diloco": _losses(
            corpus,
            outer__algorithm="diloco",
            outer__sync_every=3,
            outer__lr=1.0,
            outer__momentum=0.0,
        ),
        "1 island diloco zero1": _losses(
            corpus,
            outer__algorithm="diloco",
            outer__sync_every=3,
            outer__lr=1.0,
            outer__momentum=0.0,
            optim__distributed=True,
        ),
        "2 islands none": _losses(corpus, parallel__islands=2),
        # A synchronous warm start over the whole run: one data-parallel run.
        "2 islands diloco warm start": _losses(
            corpus,
            parallel__islands=2,
            outer__algorithm="diloco",
            outer__sync_every=3,
            outer__warm_start_steps=STEPS,
        ),
    }


@pytest.mark.slow
def test_one_island_diloco_and_joined_islands_equal_plain_dp(small_corpus: str) -> None:
    for result in run_distributed(_anchor_runs, 2, small_corpus, timeout=300):
        ref = result.pop("plain dp2")
        for name, run in result.items():
            assert len(run) == STEPS
            for step, ((loss, norm, _), (ref_loss, ref_norm, _)) in enumerate(zip(run, ref)):
                assert loss == pytest.approx(ref_loss, rel=1e-5), (name, step)
                assert norm == pytest.approx(ref_norm, rel=1e-4), (name, step)
        # The warm start's link carries what the joined islands' gradient reduction does (dp 1
        # per island: one ring over the two islands).
        joined = [r[2] for r in result["2 islands none"]]
        assert joined[0] > 0 and [r[2] for r in result["2 islands diloco warm start"]] == joined


class _Toy(nn.Module):
    """Parameters named like the model's: an embedding, two layers, a final norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 2, bias=False)
        self.layers = nn.ModuleDict({str(i): nn.Linear(2, 5) for i in range(2)})
        self.final_norm = nn.Linear(5, 1, bias=False)


def _outer_vs_direct(
    rank: int, world: int, streaming: bool, merge: str = "mix"
) -> list[tuple[int, bool, int]]:
    """2 islands x dp 2: random local progress per island, the outer step against a direct
    computation from every island's parameters (streaming: merged after the delay by ``merge``)."""
    islands, h = 2, 4
    mesh = build_mesh(ParallelConfig(islands=islands), world, rank, joined=False)
    algorithm = "streaming_diloco" if streaming else "diloco"
    cfg = OuterConfig(
        algorithm=algorithm,
        sync_every=h,
        lr=0.7,
        momentum=0.9,
        fragments=2 if streaming else None,
        fragment_delay=1 if streaming else 0,
        fragment_mix=0.25 if streaming and merge == "mix" else 0.0,
        fragment_merge=merge,
    )
    torch.manual_seed(0)
    model = _Toy()
    names = [n for n, _ in model.named_parameters()]
    fragment = {n: (0 if n.startswith(("embed", "layers.0")) else 1) for n in names}
    if not streaming:
        fragment = dict.fromkeys(names, 0)
    outer = OuterSync(model, mesh, cfg, num_layers=2, exchange=GroupExchange(mesh.island_group))
    # The reference: anchors and outer SGD per fragment, computed from gathered parameters.
    ref_anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_params = {n: nn.Parameter(t.clone()) for n, t in ref_anchor.items()}
    ref_opt = torch.optim.SGD(list(ref_params.values()), lr=0.7, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(100 + mesh.island)  # equal within an island
    offsets = [0, h // 2] if streaming else [0]
    delay = cfg.fragment_delay
    launched: dict[int, dict[str, torch.Tensor]] = {}  # fragment -> mean pseudo-gradient
    events = []
    for step in range(1, 3 * h + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        # Every island's parameters before the outer step (the reference's inputs).
        gathered = {}
        for n, p in model.named_parameters():
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous())
            # Ranks 0,1 are island 0 (dp 2), ranks 2,3 island 1.
            gathered[n] = [parts[0], parts[2]]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = dict(before)
        applying = [f for f in list(launched) if launched[f]["at"] == step]  # type: ignore[comparison-overlap]
        for f in applying:
            grads = launched.pop(f)
            for n in names:
                ref_params[n].grad = grads[n] if fragment[n] == f else None
            ref_opt.step()
            for n in names:
                if fragment[n] == f:
                    ref_anchor[n] = ref_params[n].detach().clone()
                    if merge == "carry":  # the island's own change since the exchange began
                        expected[n] = ref_anchor[n] + (before[n] - grads["start"][n])
                    else:
                        expected[n] = torch.lerp(ref_anchor[n], before[n], cfg.fragment_mix)
        for f, off in enumerate(offsets):
            if step >= off and step > 0 and (step - off) % h == 0:
                mean = {
                    n: torch.stack([ref_anchor[n] - g for g in gathered[n]]).mean(0) for n in names
                }
                mean["at"] = step + delay  # type: ignore[assignment]
                mean["start"] = {n: before[n].clone() for n in names}  # type: ignore[assignment]
                launched[f] = mean
                if delay == 0:
                    for n in names:
                        ref_params[n].grad = mean[n] if fragment[n] == f else None
                    ref_opt.step()
                    launched.pop(f)
                    for n in names:
                        if fragment[n] == f:
                            ref_anchor[n] = ref_params[n].detach().clone()
                            expected[n] = ref_anchor[n]
        record = outer.after_step(step)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6, msg=n)
        events.append((step, record["outer_sync"], record["link_bytes"]))
    return events


def _both(rank: int, world: int) -> dict[object, list[tuple[int, bool, int]]]:
    runs: dict[object, list[tuple[int, bool, int]]] = {
        s: _outer_vs_direct(rank, world, s) for s in (False, True)
    }
    runs["carry"] = _outer_vs_direct(rank, world, True, merge="carry")
    return runs


@pytest.mark.slow
def test_outer_step_equals_direct_diloco() -> None:
    runs = run_distributed(_both, 4, timeout=120)
    for streaming in (False, True):
        _check_events([run[streaming] for run in runs], streaming)
    _check_events([run["carry"] for run in runs], True)


def _check_events(events: list, streaming: bool) -> None:
    assert all(e == events[0] for e in events)  # every rank agrees on when and how much
    model = _Toy()
    numel = {0: 0, 1: 0}
    for n, p in model.named_parameters():
        numel[0 if n.startswith(("embed", "layers.0")) or not streaming else 1] += p.numel()
    # Each island's 2 dp ranks send half of the (padded) fragment each over 2 islands.
    per_fragment = {f: 2 * round(ring_all_reduce_bytes(-(-numel[f] // 2) * 4, 2)) for f in numel}
    if streaming:  # fragment 0 starts at 4, 8, 12, fragment 1 at 2, 6, 10; applied 1 step later
        starts = {4: 0, 8: 0, 12: 0, 2: 1, 6: 1, 10: 1}
        applied = {5, 9, 3, 7, 11}
    else:
        starts = {4: 0, 8: 0, 12: 0}
        applied = {4, 8, 12}
    for step, synced, sent in events[0]:
        assert synced == (step in applied), step
        assert sent == (per_fragment[starts[step]] if step in starts else 0), step


def _fault_free_resume(
    rank: int, world: int, corpus: str, root: str, warm: int
) -> dict[str, object]:
    common = dict(
        outer__warm_start_steps=warm,
        parallel__islands=2,
        outer__algorithm="streaming_diloco",
        outer__sync_every=4,
        outer__fragments=2,
        outer__fragment_delay=1,
        outer__fragment_merge="carry",  # its in-flight state holds the start parameters too
        optim__distributed=True,
        train__micro_batch_size=1,
        train__steps=STEPS,
    )
    full = tiny_overrides(corpus, checkpoint__dir=f"{root}/full", **common)
    whole = train(config_from_dict(full), progress=False).records
    part = tiny_overrides(corpus, checkpoint__dir=f"{root}/part", train__exit_interval=6, **common)
    first = train(config_from_dict(part), progress=False).records
    resumed = tiny_overrides(
        corpus, checkpoint__dir=f"{root}/part", checkpoint__resume=True, **common
    )
    second = train(config_from_dict(resumed), progress=False).records
    return {"whole": whole, "split": first + second}


@pytest.mark.slow
@pytest.mark.parametrize("warm", [0, 7])
def test_islands_resume_exactly_and_agree_after_sync(
    small_corpus: str, tmp_path: Path, warm: int
) -> None:
    """Saved at step 6 with an exchange in flight (warm 0), or inside a synchronous warm start
    that ends at step 7 (its outer rounds: fragment 1 from step 9, applied at 10)."""
    results = run_distributed(_fault_free_resume, 4, small_corpus, str(tmp_path), warm, timeout=600)
    for result in results:
        whole, split = result["whole"], result["split"]
        assert [r["step"] for r in split] == list(range(1, STEPS + 1))
        for a, b in zip(whole, split):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
            for key in ("outer_sync", "link_bytes", "islands_alive", "warm_start"):
                assert a.get(key) == b.get(key)
        synced = [r["step"] for r in whole if r["outer_sync"]]
        assert synced == ([10] if warm else [3, 5, 7, 9])
        assert [r["step"] for r in whole if r.get("warm_start")] == list(range(1, warm + 1))
    if warm:  # the warm start's steps are one data-parallel run: every island logs its loss
        for r0, r2 in zip(results[0]["whole"][:warm], results[2]["whole"][:warm]):
            assert r0["loss"] == r2["loss"]
    # The two islands (ranks 0-1 and 2-3, dp 2 each) trained on different data ...
    assert results[0]["whole"][-1]["loss"] != results[2]["whole"][-1]["loss"]
    # ... and hold the same anchors (the outer result of the last exchange of each fragment;
    # the parameters differ by each island's own steps since): compare the saved state.
    step_dir = tmp_path / "full" / "islands" / step_name(STEPS)
    a = torch.load(step_dir / "rank0.pt", weights_only=True)
    b = torch.load(step_dir / "rank2.pt", weights_only=True)
    for x, y in zip(a["outer"]["anchors"], b["outer"]["anchors"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _moments_runs(rank: int, world: int, corpus: str, root: str) -> dict[str, list]:
    common = dict(
        parallel__islands=2,
        outer__algorithm="diloco",
        outer__sync_every=5,
        outer__average_moments="both",
        train__micro_batch_size=1,
        train__steps=STEPS,
    )
    runs = {}
    for name, extra in (("replicated", {}), ("zero1", {"optim__distributed": True})):
        cfg = tiny_overrides(corpus, checkpoint__dir=f"{root}/{name}", **common, **extra)
        runs[name] = train(config_from_dict(cfg), progress=False).records
    return runs


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.slow
def test_average_moments_islands_agree_replicated_equals_zero1(
    small_corpus: str, tmp_path: Path
) -> None:
    """2 islands x dp 2 averaging both AdamW moments at each outer step (steps 5 and 10): the
    replicated optimizer (each dp rank sends a 1/dp chunk, the island all-gathers) and ZeRO-1
    (each sends its own slice) train alike, and after the last outer step both islands hold the
    same parameters and the same inner optimizer state, although they trained on different
    data."""
    results = run_distributed(_moments_runs, 4, small_corpus, str(tmp_path), timeout=600)
    for result in results:
        for a, b in zip(result["replicated"], result["zero1"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
            assert a["link_bytes"] == b["link_bytes"]
        assert [r["step"] for r in result["zero1"] if r["outer_sync"]] == [5, 10]
    assert results[0]["zero1"][-1]["loss"] != results[2]["zero1"][-1]["loss"]
    for name in ("replicated", "zero1"):
        step_dir = tmp_path / name / "islands" / step_name(STEPS)
        for rank in (0, 1):  # island 0's dp ranks against island 1's (ranks 2, 3)
            a = torch.load(step_dir / f"rank{rank}.pt", weights_only=True)
            b = torch.load(step_dir / f"rank{rank + 2}.pt", weights_only=True)
            for key in ("model", "inner"):
                pairs = list(zip(_tensors(a[key]), _tensors(b[key]), strict=True))
                assert pairs, key
                for x, y in pairs:
                    torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name} {key}")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"outer": {"sync_every": 0}}, "outer.sync_every: must be >= 1"),
        ({"outer": {"algorithm": "streaming_diloco"}}, "outer.fragments: streaming_diloco needs"),
        (
            {"outer": {"algorithm": "streaming_diloco", "fragments": 3, "sync_every": 3}},
            "outer.fragments: 3 fragments but model.num_layers = 2",
        ),
        ({"outer": {"lighthouse": "nohost"}}, "outer.lighthouse"),
        ({"outer": {"fragment_merge": "avg"}}, "outer.fragment_merge: 'avg' is not one of"),
        (
            {"outer": {"fragment_merge": "carry", "fragment_mix": 0.5}},
            "outer.fragment_mix: 0.5 is only used with fragment_merge: mix",
        ),
        ({"parallel": {"islands": 0}}, "parallel.islands: must be >= 1"),
        (
            {"outer": {"average_moments": "first"}},
            "outer.average_moments: first needs algorithm diloco",
        ),
        (
            {
                "outer": {
                    "algorithm": "streaming_diloco",
                    "fragments": 2,
                    "sync_every": 4,
                    "average_moments": "both",
                }
            },
            "outer.average_moments: both needs algorithm diloco",
        ),
        (
            {"outer": {"algorithm": "diloco", "warm_start_steps": -1}},
            "outer.warm_start_steps: must be >= 0",
        ),
        (
            {"outer": {"warm_start_steps": 10}},
            "outer.warm_start_steps: 10 with algorithm none",
        ),
    ],
)
def test_bad_outer_config(overrides: dict, match: str) -> None:
    base = {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**base, **overrides})


def test_islands_must_divide_world() -> None:
    from yuanlfa.config import resolve

    cfg = config_from_dict({"parallel": {"islands": 2}, "model": {"vocab_size": 128}})
    with pytest.raises(ConfigError, match="parallel.islands: 2 islands do not divide"):
        resolve(cfg, 3)


class _FakeRounds:
    """An exchange of one island with two islands' bookkeeping: ``peer`` is the other island's
    pseudo-gradient added in each sum; ``commits`` the answers of should_commit in turn; ``heal``
    a callback run in the first quorum (torchft's recovery)."""

    def __init__(self, peer: float, commits: list[bool], heal=None) -> None:
        self.peer, self.commits, self.heal = peer, list(commits), heal
        self.log: list[str] = []

    def size(self) -> int:
        return 2

    def begin(self, step: int) -> None:
        self.log.append(f"begin {step}")
        if self.heal is not None:
            self.heal()
            self.heal = None

    def start_sum(self, tensor):
        tensor.add_(self.peer)
        self.log.append("sum")
        return _NoWork()

    def commit(self) -> bool:
        self.log.append("commit")
        return self.commits.pop(0)

    def healthy(self) -> bool:
        return True


class _NoWork:
    def wait(self) -> None:
        return None


def _one_param_outer(exchange, delay: int = 0, warm: int = 0):
    import torch
    from torch import nn

    from yuanlfa.config import ParallelConfig
    from yuanlfa.parallel import build_mesh
    from yuanlfa.parallel.islands import OuterSync

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    mesh = build_mesh(ParallelConfig(), 1, 0)
    cfg = OuterConfig(algorithm="diloco", sync_every=2, lr=1.0, momentum=0.0)
    if delay:  # one fragment, its exchange overlapped with ``delay`` steps
        cfg = OuterConfig(
            algorithm="streaming_diloco", sync_every=2, lr=1.0, momentum=0.0, fragments=1
        )
        cfg = dataclasses.replace(cfg, fragment_delay=delay)
    cfg = dataclasses.replace(cfg, warm_start_steps=warm)
    return model, OuterSync(model, mesh, cfg, num_layers=1, exchange=exchange, warm_start_bytes=8)


def test_warm_start_then_outer_steps_from_its_end() -> None:
    import torch

    exchange = _FakeRounds(peer=0.5, commits=[True])
    model, outer = _one_param_outer(exchange, warm=3)
    for step, weight in ((1, 0.8), (2, 0.6), (3, 0.4)):  # steps reduced across the islands
        assert outer.synchronous(step - 1)
        with torch.no_grad():
            model.weight.fill_(weight)
        record = outer.after_step(step)
        assert record == {
            "outer_sync": False,
            "link_bytes": 8,
            "islands_alive": 2,
            "warm_start": True,
        }
    assert not outer.synchronous(3) and exchange.log == []
    # The first anchor is the warm start's end, not the initial parameters.
    assert outer.fragments[0].anchor.item() == pytest.approx(0.4)
    with torch.no_grad():
        model.weight.fill_(0.2)
    assert not outer.after_step(4)["outer_sync"]  # sync_every 2 counts from step 3
    record = outer.after_step(5)
    assert record["outer_sync"] and record["link_bytes"] > 0 and exchange.log[0] == "begin 5"
    # Pseudo-gradient 0.4 - 0.2, averaged with the peer's 0.5; outer lr 1.
    assert model.weight.item() == pytest.approx(0.4 - (0.2 + 0.5) / 2)


def test_average_moments_with_the_outer_step() -> None:
    """The inner AdamW moments become the islands' mean at an outer step (a fake peer island
    adds its value to every sum), and only when the round commits."""
    import torch

    for moments, keys in (("first", ["exp_avg"]), ("both", ["exp_avg", "exp_avg_sq"])):
        exchange = _FakeRounds(peer=0.5, commits=[False, True])
        model, _ = _one_param_outer(exchange)
        adam = torch.optim.AdamW(model.parameters(), lr=0.1)
        cfg = OuterConfig(algorithm="diloco", sync_every=2, lr=1.0, momentum=0.0)
        cfg = dataclasses.replace(cfg, average_moments=moments)
        mesh = build_mesh(ParallelConfig(), 1, 0)
        outer = OuterSync(model, mesh, cfg, num_layers=1, exchange=exchange, optimizer=adam)
        for step in (2, 4):
            model.weight.grad = torch.ones_like(model.weight)
            adam.step()
            state = adam.state[model.weight]
            before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
            record = outer.after_step(step)
            for k, value in before.items():
                averaged = record["outer_sync"] and k in keys
                want = (value + 0.5) / 2 if averaged else value
                torch.testing.assert_close(state[k], want, msg=f"{moments} {k} step {step}")
        # Each moment adds the parameters' fp32 bytes to the round (one island of one rank).
        assert record["link_bytes"] == round(ring_all_reduce_bytes(4 * (1 + len(keys)), 2))


def test_outer_step_only_when_every_island_may_commit() -> None:
    import torch

    exchange = _FakeRounds(peer=0.5, commits=[False, True])
    model, outer = _one_param_outer(exchange)
    with torch.no_grad():
        model.weight.sub_(0.25)  # local progress: pseudo-gradient 0.25
    record = outer.after_step(2)
    # No commit: no outer step, the local progress stays and the anchor is unchanged.
    assert not record["outer_sync"] and model.weight.item() == 0.75
    assert outer.fragments[0].anchor.item() == 1.0
    with torch.no_grad():
        model.weight.sub_(0.25)  # pseudo-gradient now 0.5 (both steps' progress)
    record = outer.after_step(4)
    # Commit: mean of (0.5 here, 0.5 the peer) = 0.5 with lr 1 from the anchor 1.0.
    assert record["outer_sync"] and model.weight.item() == 0.5
    assert exchange.log == ["begin 2", "sum", "commit", "begin 4", "sum", "commit"]


def test_join_healed_takes_part_in_the_live_round() -> None:
    """A healed island continues from the live island's step and joins its round."""
    import torch

    exchange = _FakeRounds(peer=0.25, commits=[True])
    model, outer = _one_param_outer(exchange)

    def heal() -> None:  # what LiveState.load_state_dict does: the live island's state at step 6
        with torch.no_grad():
            model.weight.fill_(0.75)  # its parameters after local steps, anchor still 1.0
        outer.healed(6)

    exchange.heal = heal
    assert outer.join(0) == 6
    # Its pseudo-gradient equals the live one's (0.25): the mean is 0.25, the result 0.75.
    assert model.weight.item() == 0.75 and outer.fragments[0].anchor.item() == 0.75
    assert exchange.log == ["begin 0", "sum", "commit"]
    fresh = _FakeRounds(peer=0.0, commits=[True])
    _, alone = _one_param_outer(fresh)
    assert alone.join(0) == 0 and fresh.log == ["begin 0", "commit"]  # nothing to exchange


def test_delayed_round_commits_when_applied() -> None:
    """With fragment_delay a round's quorum and sum start after one step, its commit comes
    fragment_delay steps later, before the next round's quorum; a round that may not commit
    leaves the local progress (of the delay's steps too) in place."""
    import torch

    exchange = _FakeRounds(peer=0.5, commits=[False, True])
    model, outer = _one_param_outer(exchange, delay=1)
    with torch.no_grad():
        model.weight.sub_(0.25)
    assert not outer.after_step(2)["outer_sync"]  # started: quorum and sum, no commit yet
    assert exchange.log == ["begin 2", "sum"]
    with torch.no_grad():
        model.weight.sub_(0.25)
    assert not outer.after_step(3)["outer_sync"]  # no commit: nothing applied
    assert model.weight.item() == 0.5 and outer.fragments[0].anchor.item() == 1.0
    assert outer.after_step(4)["outer_sync"] is False  # the next round starts (pseudo-gradient 0.5)
    assert exchange.log == ["begin 2", "sum", "commit", "begin 4", "sum"]
    with torch.no_grad():
        model.weight.sub_(0.125)  # a step during the exchange: replaced (fragment_mix 0)
    record = outer.after_step(5)
    # Commit: mean(0.5 here, 0.5 the peer) from the anchor 1.0 with lr 1.
    assert record["outer_sync"] and model.weight.item() == 0.5
    assert exchange.log[-1] == "commit"


def test_live_state_is_a_copy_taken_at_a_round_start() -> None:
    """What a live island serves a healed one is its state when the round opens, copied: the
    live island trains on while the healed one fetches it."""
    import types

    import torch

    from yuanlfa.train.islands import LiveState

    exchange = _FakeRounds(peer=0.5, commits=[True])
    model, outer = _one_param_outer(exchange, delay=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 1)).sum().backward()
    optimizer.step()
    holder = types.SimpleNamespace(
        step=2, consumed=8, model=model, optimizer=optimizer, outer=outer
    )
    state = LiveState(holder).state_dict()
    before = model.weight.item()
    model(torch.ones(1, 1)).sum().backward()
    optimizer.step()  # the live island trains on
    assert state["model"]["weight"].item() == before != model.weight.item()
    moments = state["inner"]["state"][0]["exp_avg"]
    assert moments.data_ptr() != optimizer.state[model.weight]["exp_avg"].data_ptr()
    outer.after_step(2)  # a round in flight: not a round's start
    with pytest.raises(RuntimeError, match="exchange in flight"):
        LiveState(holder).state_dict()
