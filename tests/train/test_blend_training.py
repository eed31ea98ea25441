"""data.blend end to end: datasets built per component and interleaved by weight, training and
resuming on the blend, and the configuration errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tiny import tiny_overrides
from yuanlfa.config import ConfigError, config_from_dict
from yuanlfa.data import ByteTokenizer, IndexedDatasetBuilder, MMapIndexedDataset, best_dtype
from yuanlfa.data.blended import BlendedDataset
from yuanlfa.data.build import build_datasets
from yuanlfa.train import train


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = ByteTokenizer()
    prefix = str(tmp_path_factory.mktemp("text") / "text")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with IndexedDatasetBuilder(prefix, best_dtype(tok.vocab_size)) as builder:
        for _ in range(300):
            text = " ".join(rng.choice(words, size=int(rng.integers(5, 40))))
            builder.add_document(tok.encode(text) + [tok.eod])
        builder.finalize()
    return prefix


def test_blend_samples_come_from_components_by_weight(small_corpus, text_corpus, tmp_path):
    cfg = config_from_dict(
        {"data": {"blend": [0.25, small_corpus, 0.75, text_corpus], "cache_dir": str(tmp_path)}}
    )
    data = build_datasets(cfg.data, vocab_size=384, seq_length=32, train_samples=200,
                          valid_samples=8, seed=3, progress=False)  # fmt: skip
    assert isinstance(data.train, BlendedDataset) and isinstance(data.valid, BlendedDataset)
    assert len(data.train) == 200 and len(data.valid) == 8
    counts = np.bincount(data.train.dataset_index, minlength=2)
    assert abs(counts[0] - 50) <= 1 and abs(counts[1] - 150) <= 1
    text_ids = set(np.unique(MMapIndexedDataset(text_corpus).get(0)).tolist())
    for i in range(0, 200, 7):
        k, j = int(data.train.dataset_index[i]), int(data.train.dataset_sample_index[i])
        np.testing.assert_array_equal(data.train[i]["tokens"], data.train.datasets[k][j]["tokens"])
        from_text = set(np.unique(data.train[i]["tokens"].numpy()).tolist()) <= text_ids | {256}
        assert from_text == (k == 1), i
    assert "0.25*" in data.prefix and "0.75*" in data.prefix


@pytest.mark.parametrize("blend", [False, True], ids=["one", "blend"])
def test_build_datasets_match_megatron(small_corpus, text_corpus, tmp_path, blend):
    """The training and validation samples the trainer builds are megatron-core's (issue 24)."""
    from tests.data.test_megatron_equivalence import assert_same_samples, megatron_build

    split, seed, seq = "70,20,10", 11, 32
    data_cfg = {"split": split, "eod_mask_loss": True, "cache_dir": str(tmp_path)}
    if blend:
        data_cfg["blend"] = [0.25, small_corpus, 0.75, text_corpus]
        prefixes, weights = [small_corpus, text_corpus], [0.25, 0.75]
    else:
        data_cfg["path"] = text_corpus
        prefixes, weights = [text_corpus], None
    train_n, valid_n = 300, 40
    data = build_datasets(config_from_dict({"data": data_cfg}).data, vocab_size=384,
                          seq_length=seq, train_samples=train_n, valid_samples=valid_n,
                          seed=seed, progress=False)  # fmt: skip
    theirs = megatron_build(prefixes, weights, [train_n, valid_n, 0], seed=seed, seq_length=seq,
                            eod=ByteTokenizer().eod, split=split, eod_mask_loss=True)  # fmt: skip
    assert_same_samples(data.train, theirs[0], train_n)
    assert_same_samples(data.valid, theirs[1], valid_n)


def test_train_and_resume_on_a_blend(small_corpus, text_corpus, tmp_path):
    base = tiny_overrides(
        small_corpus, data__blend=[0.5, small_corpus, 0.5, text_corpus], train__steps=6,
        data__num_workers=0, checkpoint__dir=str(tmp_path / "ck"), checkpoint__interval=3,
    )  # fmt: skip
    del base["data"]["path"]
    full = [r["loss"] for r in train(config_from_dict(base), progress=False).records]
    assert len(full) == 6
    # The same run stopped after step 3 (train.exit_interval), then resumed.
    base["checkpoint"]["dir"] = str(tmp_path / "again")
    base["train"]["exit_interval"] = 3
    first = train(config_from_dict(base), progress=False).records
    assert [r["step"] for r in first] == [1, 2, 3]
    base["checkpoint"]["resume"] = True
    resumed = [r["loss"] for r in train(config_from_dict(base), progress=False).records]
    assert resumed == pytest.approx(full[3:], rel=1e-6)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"blend": ["0.5", "a", "0.5"]}, "data.blend"),
        ({"blend": ["x", "a"]}, "data.blend"),
        ({"blend": ["-1", "a", "2", "b"]}, "data.blend"),
        ({"blend": ["0.5", "a", "0.5", "a"]}, "data.blend"),
        ({"blend": ["1", "a"], "path": "b"}, "not both"),
        ({"sft": True, "fim_rate": 0.5}, "data.sft"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"data": data})


def test_missing_component_named(tmp_path, small_corpus):
    cfg = config_from_dict({"data": {"blend": [1, small_corpus, 1, str(tmp_path / "nope")]}})
    with pytest.raises(ConfigError, match=r"data.blend: .*nope.bin not found"):
        build_datasets(cfg.data, vocab_size=384, seq_length=32, train_samples=10,
                       valid_samples=0, seed=1, progress=False)  # fmt: skip
