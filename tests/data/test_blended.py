"""Blending several datasets: the index builders (C++ == numpy == a brute-force reference),
the greedy's guarantees, parse_blend, component_samples and BlendedDataset over PackedDatasets."""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest
import torch

from yuanlfa.config import ConfigError, parse_blend
from yuanlfa.data import (
    DataError,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    PackedDataset,
    index_helpers,
)
from yuanlfa.data.blended import BlendedDataset, component_samples
from yuanlfa.data.index_helpers import build_blending_indices, have_cpp, positions_in_datasets

EOD = 256


def brute_force(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """Megatron's loop written out plainly: the largest shortfall wins, the first on ties."""
    counts = [0] * len(weights)
    picks, positions = [], []
    for i in range(size):
        shortfall = [w * max(i, 1) - c for w, c in zip(weights, counts)]
        d = shortfall.index(max(shortfall))
        picks.append(d)
        positions.append(counts[d])
        counts[d] += 1
    return picks, positions


def random_weights(rng: np.random.Generator) -> np.ndarray:
    """Normalized weights of many shapes: near-uniform, skewed, tied, decimal, tiny, wide."""
    kind = int(rng.integers(0, 6))
    n = int(rng.choice([1, 2, 3, 4, 7, 31, 32, 33, 100, 255]))
    if kind == 0:
        w = rng.random(n) + 1e-3
    elif kind == 1:  # a few large shares, many tiny ones
        w = rng.dirichlet(np.full(n, 0.2)) + 1e-9
    elif kind == 2:  # equal weights: every step is a tie among some datasets
        w = np.ones(n)
    elif kind == 3:  # decimal weights, as users write them: exact ties in real arithmetic
        w = rng.integers(1, 10, size=n) / 10
    elif kind == 4:  # one dataset dominates
        w = np.ones(n)
        w[int(rng.integers(0, n))] = float(rng.integers(1, 10_000))
    else:  # integer ratios
        w = rng.integers(1, 5, size=n).astype(np.float64)
    return w / np.sum(w)


def shares_of(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """counts[n - 1, d]: samples from dataset d among the first n."""
    onehot = dataset_index[:, None] == np.arange(num_datasets)[None, :]
    return np.cumsum(onehot, axis=0)


needs_cpp = pytest.mark.skipif(
    not have_cpp(),
    reason="yuanlfa._index_helpers is not built (pip install -e . with a C++ compiler)",
)


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
def test_hand_worked_case(impl):
    if impl == "cpp" and not have_cpp():
        pytest.skip("yuanlfa._index_helpers is not built")
    # 0.3/0.7, shortfalls per step: (0.3, 0.7) -> 1, (0.3, -0.3) -> 0, (-0.4, 0.4) -> 1,
    # (-0.1, 0.1) -> 1, (0.2, -0.2) -> 0, ...
    index, positions = build_blending_indices(np.array([0.3, 0.7]), 10, impl=impl)
    assert index.dtype == np.int16 and positions.dtype == np.int64  # Megatron's types
    assert index.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert positions.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]
    index, positions = build_blending_indices([1 / 3] * 3, 7, impl=impl)
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 0]  # ties go to the first
    assert positions.tolist() == [0, 0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
def test_matches_brute_force(impl):
    if impl == "cpp" and not have_cpp():
        pytest.skip("yuanlfa._index_helpers is not built")
    rng = np.random.default_rng(0)
    for _ in range(40):
        w = random_weights(rng)
        size = int(rng.integers(0, 300))
        index, positions = build_blending_indices(w, size, impl=impl)
        expected = brute_force(w.tolist(), size)
        assert (index.tolist(), positions.tolist()) == expected


@needs_cpp
def test_cpp_equals_numpy_random():
    rng = np.random.default_rng(1)
    for _ in range(400):
        w = random_weights(rng)
        size = int(rng.choice([0, 1, 2, int(rng.integers(0, 3000))]))
        cpp = build_blending_indices(w, size, impl="cpp")
        numpy = build_blending_indices(w, size, impl="numpy")
        assert cpp[0].dtype == numpy[0].dtype == np.int16
        assert cpp[1].dtype == numpy[1].dtype == np.int64
        np.testing.assert_array_equal(cpp[0], numpy[0])
        np.testing.assert_array_equal(cpp[1], numpy[1])


@pytest.mark.parametrize("impl", ["cpp", "numpy"])
@pytest.mark.parametrize("n,dtype", [(300, np.int16), (32767, np.int16), (32768, np.int32)])
def test_any_number_of_datasets(impl, n, dtype):
    if impl == "cpp" and not have_cpp():
        pytest.skip("yuanlfa._index_helpers is not built")
    index, positions = build_blending_indices(np.full(n, 1 / n), 40, impl=impl)
    assert index.dtype == dtype
    assert index.tolist() == list(range(40)) and positions.tolist() == [0] * 40  # ties: first
    w = np.zeros(n)
    w[-3:] = [0.25, 0.25, 0.5]
    w[:-3] = 1e-12
    w /= w.sum()
    index, _ = build_blending_indices(w, 4, impl=impl)
    assert index.tolist() == [n - 1, n - 3, n - 2, n - 1]  # the last ids fit the type


@needs_cpp
def test_cpp_equals_numpy_long_run():
    # Far enough that x * w loses low bits and near-ties are decided by rounding.
    w = np.array([0.1, 0.2, 0.3, 0.4])
    w /= w.sum()
    cpp = build_blending_indices(w, 200_000, impl="cpp")
    numpy = build_blending_indices(w, 200_000, impl="numpy")
    np.testing.assert_array_equal(cpp[0], numpy[0])
    np.testing.assert_array_equal(cpp[1], numpy[1])


def test_numpy_loop_equals_numpy_vector(monkeypatch):
    # The fallback loops in Python for few datasets and uses one argmax per sample for many;
    # forcing each path everywhere, they agree (also without the extension).
    rng = np.random.default_rng(2)
    cases = [(random_weights(rng), int(rng.integers(0, 500))) for _ in range(30)]
    monkeypatch.setattr(index_helpers, "_VECTOR_FROM", 1)
    vector = [build_blending_indices(w, n, impl="numpy") for w, n in cases]
    monkeypatch.setattr(index_helpers, "_VECTOR_FROM", 1000)
    for (w, n), (index, positions) in zip(cases, vector):
        loop_index, loop_positions = build_blending_indices(w, n, impl="numpy")
        np.testing.assert_array_equal(index, loop_index)
        np.testing.assert_array_equal(positions, loop_positions)


def test_greedy_bounds():
    """What the algorithm guarantees, checked after every prefix of random blends.

    At step i >= 1 the shortfalls ``w_d * i - count_d`` sum to zero, so the largest is >= 0: a
    dataset is picked only when it is not ahead of its share, then drops by less than one and
    rises again until picked. Hence no dataset ever holds ``w_d * n + 1`` samples after n (step
    0 picks the largest weight, whose count 1 is below w + 1). The shortfalls summing to zero,
    each above -1, none exceeds (number of datasets - 1): for two datasets, less than one.
    """
    rng = np.random.default_rng(3)
    for _ in range(60):
        w = random_weights(rng)
        size = int(rng.integers(1, 2000))
        index, positions = build_blending_indices(w, size)
        counts = shares_of(index, len(w))
        share = np.arange(1, size + 1)[:, None] * w[None, :]
        ahead = counts - share
        assert ahead.max() < 1 + 1e-9
        assert (-ahead).max() < max(1, len(w) - 1) + 1e-9
        # Every dataset's samples are taken in order 0, 1, 2, ... with no gaps.
        for d in range(len(w)):
            assert positions[index == d].tolist() == list(range(int(counts[-1, d])))


def test_positions_in_datasets():
    rng = np.random.default_rng(4)
    for _ in range(20):
        w = random_weights(rng)
        index, positions = build_blending_indices(w, int(rng.integers(0, 1000)))
        np.testing.assert_array_equal(positions_in_datasets(index, len(w)), positions)
    assert positions_in_datasets(np.zeros(0, dtype=np.int16), 3).tolist() == []


ERRORS = [
    (([], 5), "need at least 1 dataset, got 0"),
    ((np.full(256, 1 / 256), 5), None),  # valid: more than a byte's worth of datasets
    (([1.5, -0.5], 5), "weights[1] = -0.5 is not a finite number > 0"),
    (([0.5, 0.0, 0.5], 5), "weights[1] = 0 is not a finite number > 0"),
    (([float("nan"), 1.0], 5), "weights[0] = nan is not a finite number > 0"),
    (([-float("nan"), 1.0], 5), "weights[0] = nan is not a finite number > 0"),
    (([1.0, float("inf")], 5), "weights[1] = inf is not a finite number > 0"),
    (([0.5, 1e-300, 0.5], 5), None),  # valid: tiny but positive
    (([0.5, 0.25], 5), "the weights sum to 0.75, not 1; normalize them first"),
    (([3.0, 7.0], 5), "the weights sum to 10, not 1"),
    (([0.5, 0.5 + 2e-5], 5), "the weights sum to 1.00002, not 1"),
    (([1e20, 1.0], 5), "the weights sum to 1e+20, not 1"),
    (([1.0], -1), "size must be in [0, 2**63 - 1], got -1"),
    (([1.0], 2**64), f"size must be in [0, 2**63 - 1], got {2**64}"),
    (([[0.5, 0.5]], 5), "weights must be a 1-D array of numbers, got float64 [2-D]"),
    ((["a", "b"], 5), "weights must be a 1-D array of numbers, got <U1 [1-D]"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_numpy_errors(args, message):
    if message is None:
        assert len(build_blending_indices(*args, impl="numpy")[0]) == args[1]
        return
    with pytest.raises(DataError, match=re.escape(message)):
        build_blending_indices(*args, impl="numpy")


@needs_cpp
@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_cpp_errors_match_numpy(args, message):
    if message is None:
        np.testing.assert_array_equal(
            build_blending_indices(*args, impl="cpp")[0],
            build_blending_indices(*args, impl="numpy")[0],
        )
        return
    with pytest.raises(DataError) as cpp_err:
        build_blending_indices(*args, impl="cpp")
    with pytest.raises(DataError) as numpy_err:
        build_blending_indices(*args, impl="numpy")
    assert str(cpp_err.value) == str(numpy_err.value)


@needs_cpp
def test_extension_checks_on_its_own():
    from yuanlfa import _index_helpers

    cases = [
        ((np.array([0.5, -0.5]), 3), "weights[1] = -0.5 is not a finite number > 0"),
        ((np.array([0.5]), 3), "the weights sum to 0.5, not 1"),
        ((np.array([1.0]), -2), "size must be in [0, 2**63 - 1], got -2"),
        ((np.array([1, 0]), 3), "must be a 1-D float64 array in native byte order"),
        ((np.array([1.0]).astype(">f8"), 3), "must be a 1-D float64 array in native byte order"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _index_helpers.build_blending_indices(*args)
    # A strided view is read in place.
    index, _ = _index_helpers.build_blending_indices(np.array([0.3, 9.0, 0.7])[::2], 10)
    assert index.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]


def test_impl_choice(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of auto, cpp, numpy"):
        build_blending_indices([1.0], 3, impl="fortran")
    monkeypatch.setattr(index_helpers, "_cpp", None)
    with pytest.raises(ImportError, match=r"blending-index builder .* not built"):
        build_blending_indices([1.0], 3, impl="cpp")
    assert build_blending_indices([0.5, 0.5], 3)[0].tolist() == [0, 1, 0]


GOOD_BLENDS = [
    (["/data/a"], [(1.0, "/data/a")]),
    (["0.3", "/data/a", "0.7", "/data/b"], [(0.3, "/data/a"), (0.7, "/data/b")]),
    ("0.3 /data/a 0.7 /data/b", [(0.3, "/data/a"), (0.7, "/data/b")]),
    ([0.25, "a", 3, "b/c"], [(0.25, "a"), (3.0, "b/c")]),  # YAML numbers, relative prefixes
    (("1e-3", "x", "2", "./7"), [(0.001, "x"), (2.0, "./7")]),
]


@pytest.mark.parametrize(("items", "expected"), GOOD_BLENDS)
def test_parse_blend(items, expected):
    assert parse_blend(items) == expected


BAD_BLENDS = [
    ([], "no datasets; give pairs like '0.3 /data/a 0.7 /data/b'"),
    ([""], "the prefix is empty"),
    (["0.3"], "'0.3' is a weight with no prefix after it; give pairs like"),
    (["0.3", "/a", "0.7"], "3 items, an odd number, so not weight and prefix pairs; give pairs"),
    (["/a", "/b"], "item 1 of 2 ('/a') should be a weight: each prefix needs one before it"),
    (["0.3", "/a", "heavy", "/b"], "item 3 of 4 ('heavy') should be a weight"),
    (["0", "/a"], "weight 0 (item 1 of 2) must be a finite number > 0"),
    (["-0.5", "/a"], "weight -0.5 (item 1 of 2) must be a finite number > 0"),
    (["nan", "/a"], "weight nan (item 1 of 2) must be a finite number > 0"),
    (["inf", "/a"], "weight inf (item 1 of 2) must be a finite number > 0"),
    (["0.3", "0.7"], "item 2 of 2 ('0.7') should be the prefix after weight 0.3"),
    (["0.3", ""], "item 2 of 2 is an empty prefix"),
    (["0.3", "/a", "0.7", "/a"], "prefix /a is given twice (items 2 and 4 of 4); give it once"),
    (["1", "data/a", "2", "/b", "3", "data//a/"], "prefix data//a/ is given twice (items 2 and 6"),
]


@pytest.mark.parametrize(("items", "message"), BAD_BLENDS)
def test_parse_blend_errors(items, message):
    with pytest.raises(ConfigError) as err:
        parse_blend(items)
    assert str(err.value).startswith("data.blend: ")
    assert message in str(err.value)


def test_component_samples():
    # megatron-core's ceil(ceil(n * w) * 1.005): ceil(300 * 1.005), ceil(700 * 1.005)
    assert component_samples([0.3, 0.7], 1000) == [302, 704]
    assert component_samples([1, 3], 100) == [26, 76]  # normalized first: 25 * 1.005, 75 * 1.005
    assert component_samples([1, 2], 10) == [5, 8]  # ceil(3.33) = 4 -> 4.02, 7 -> 7.035
    assert component_samples([2.0], 0) == [0]
    assert component_samples([5.0], 1000) == [1005]
    with pytest.raises(DataError, match="num_samples must be >= 0"):
        component_samples([1.0], -1)
    with pytest.raises(DataError, match="blend weight 1 is -1; every weight must be finite"):
        component_samples([1.0, -1.0], 10)
    with pytest.raises(DataError, match="one or more blend weights"):
        component_samples([], 10)


def test_component_samples_are_always_enough():
    # A dataset never gets w * n + 1 samples or more (test_greedy_bounds), and
    # component_samples asks for ceil(ceil(w * n) * 1.005) >= that: the blend never runs short.
    rng = np.random.default_rng(5)
    for _ in range(100):
        raw = random_weights(rng) * float(rng.choice([1, 7, 1000]))
        n = int(rng.integers(0, 3000))
        counts = component_samples(raw.tolist(), n)
        blend = BlendedDataset([range(c) for c in counts], raw.tolist(), n)
        assert [blend[i] for i in range(n)] == blend.dataset_sample_index.tolist()


def write(tmp_path, name: str, seed: int, num_docs: int = 30) -> MMapIndexedDataset:
    rng = np.random.default_rng(seed)
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(num_docs):
            body = rng.integers(0, 256, size=int(rng.integers(1, 30)))
            builder.add_item(np.append(body, EOD))
            builder.end_document()
    return MMapIndexedDataset(prefix)


def packed(indexed: MMapIndexedDataset, num_samples: int, seed: int = 3) -> PackedDataset:
    return PackedDataset(
        indexed,
        seq_length=8,
        num_samples=num_samples,
        seed=seed,
        eod_id=EOD,
        documents=np.arange(indexed.num_documents),
    )


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    return write(tmp, "code", seed=1), write(tmp, "text", seed=2)


def test_blended_samples_are_component_samples(two_datasets):
    weights, n = [0.3, 0.7], 200
    components = [packed(ix, c) for ix, c in zip(two_datasets, component_samples(weights, n))]
    blend = BlendedDataset(components, weights, n)
    assert len(blend) == n
    index, positions = build_blending_indices(np.array(weights), n)
    np.testing.assert_array_equal(blend.dataset_index, index)
    np.testing.assert_array_equal(blend.dataset_sample_index, positions)
    for i in range(n):
        component = components[int(index[i])]
        j = int(positions[i])
        np.testing.assert_array_equal(blend.sample_tokens(i), component.sample_tokens(j))
        got, want = blend[i], component[j]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])
    np.testing.assert_array_equal(blend.sample_tokens(-1), blend.sample_tokens(n - 1))
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match="out of range"):
            blend[bad]


def test_blended_proportions(two_datasets):
    weights, n = [1.0, 3.0], 400  # normalized to 0.25, 0.75
    components = [packed(ix, c) for ix, c in zip(two_datasets, component_samples(weights, n))]
    blend = BlendedDataset(components, weights, n)
    assert blend.weights == [0.25, 0.75]
    counts = np.bincount(blend.dataset_index, minlength=2)
    assert counts.tolist() == [100, 300]
    # Every window of 4 consecutive samples holds exactly one from the lighter component.
    assert np.all(blend.dataset_index.reshape(-1, 4).sum(axis=1) == 3)


def test_blended_too_short_component(two_datasets):
    code, text = two_datasets
    with pytest.raises(DataError) as err:
        BlendedDataset([packed(code, 30), packed(text, 60)], [0.3, 0.7], 100)
    message = str(err.value)
    assert f"component 1 ({text.prefix}) of the blend has 60 samples" in message
    assert "needs 70" in message and "component_samples" in message
    with pytest.raises(DataError, match="2 datasets but 3 blend weights"):
        BlendedDataset([packed(code, 30), packed(text, 60)], [0.3, 0.3, 0.4], 10)


def test_blended_pickles(two_datasets):
    weights, n = [0.5, 0.2], 150
    components = [packed(ix, c) for ix, c in zip(two_datasets, component_samples(weights, n))]
    blend = BlendedDataset(components, weights, n)
    again = pickle.loads(pickle.dumps(blend))
    np.testing.assert_array_equal(again.dataset_index, blend.dataset_index)
    np.testing.assert_array_equal(again.dataset_sample_index, blend.dataset_sample_index)
    assert again.dataset_sample_index.dtype == np.int64
    for i in range(0, n, 7):
        np.testing.assert_array_equal(again.sample_tokens(i), blend.sample_tokens(i))
        assert torch.equal(again[i]["tokens"], blend[i]["tokens"])


def test_blend_of_one(two_datasets):
    blend = BlendedDataset([packed(two_datasets[0], 20)], [2.0], 20)
    assert blend.dataset_index.tolist() == [0] * 20
    assert blend.dataset_sample_index.tolist() == list(range(20))
    assert math.isclose(blend.weights[0], 1.0)
