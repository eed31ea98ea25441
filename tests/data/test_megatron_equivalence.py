"""Our samples against megatron-core's own GPTDataset and BlendedMegatronDatasetBuilder.

A small corpus is written with our IndexedDatasetBuilder and read by both stacks; every sample
asked for must agree token for token, position ids and loss masks included, for fewer than one
epoch, exactly one, several with a last epoch shuffled apart (< 80% used) and several without;
train and valid; one dataset and blends.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from yuanlfa.data import IndexedDatasetBuilder, MMapIndexedDataset, PackedDataset, split_documents
from yuanlfa.data.blended import BlendedDataset, component_samples
from yuanlfa.data.megatron_index import epochs_needed, samples_before_last_epoch, samples_in

EOD = 256
SEQ = 16
SPLIT = "70,20,10"


def _build_helpers(source: Path, out_dir: Path) -> Path:
    """Compile megatron-core's helpers.cpp into ``out_dir`` (its wheel ships the source only;
    Megatron compiles it with make in site-packages on first use, which a read-only install
    cannot). pybind11's headers come from pybind11 or, failing that, from torch."""
    try:
        import pybind11

        include = pybind11.get_include()
    except ImportError:
        include = str(Path(torch.__file__).parent / "include")
    target = out_dir / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [
        os.environ.get("CXX", "g++"), "-O3", "-shared", "-fPIC", "-std=c++17",
        f"-I{include}", f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return target


def _megatron_datasets():
    """megatron.core.datasets with its C++ helpers, or a skip that says what is missing."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the dev extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = "megatron.core.datasets.helpers_cpp"
        try:
            importlib.import_module(name)
        except ImportError:
            package = importlib.import_module("megatron.core.datasets")
            source = Path(package.__file__).parent / "helpers.cpp"
            try:
                path = _build_helpers(source, Path(tempfile.mkdtemp(prefix="megatron_helpers")))
            except (OSError, subprocess.SubprocessError) as exc:
                pytest.skip(f"megatron-core's C++ dataset helpers could not be compiled ({exc})")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        builder = importlib.import_module("megatron.core.datasets.blended_megatron_dataset_builder")
        gpt = importlib.import_module("megatron.core.datasets.gpt_dataset")
    return builder.BlendedMegatronDatasetBuilder, gpt.GPTDataset, gpt.GPTDatasetConfig


class _Tokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer; no pad token (so none is masked)."""

    vocab_size = None  # token type read from the .idx file
    unique_identifiers = {"class": "test tokenizer"}

    def __init__(self, eod: int) -> None:
        self.eod = eod


def _write(tmp_path, name: str, seed: int, num_docs: int) -> str:
    rng = np.random.default_rng(seed)
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(num_docs):
            body = rng.integers(0, 256, size=int(rng.integers(0, 40)))
            builder.add_item(np.append(body, EOD))
            builder.end_document()
    return prefix


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_eq")
    return [_write(tmp, f"d{k}", seed=k, num_docs=n) for k, n in enumerate((60, 45, 30))]


def megatron_build(prefixes, weights, sizes, *, seed, seq_length=SEQ, eod=EOD, split=SPLIT,
                   eod_mask_loss=False, reset_position_ids=True):  # fmt: skip
    """megatron-core's train, valid and test datasets, as its pretrain_gpt builds them."""
    builder_cls, gpt_cls, config_cls = _megatron_datasets()
    config = config_cls(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), weights),
        split=split,
        tokenizer=_Tokenizer(eod),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        # None: next to the data (a cached blend would ask torch.distributed for the rank).
        path_to_cache=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder_cls(gpt_cls, sizes, lambda: True, config).build()


def _megatron(prefixes, weights, sizes, seed, eod_mask_loss, reset_position_ids):
    return megatron_build(prefixes, weights, sizes, seed=seed, eod_mask_loss=eod_mask_loss,
                          reset_position_ids=reset_position_ids)  # fmt: skip


def _ours(prefix, split, num_samples, seed, eod_mask_loss, reset_position_ids, cache_dir=None):
    indexed = MMapIndexedDataset(prefix)
    documents = split_documents(indexed.num_documents, SPLIT)[split]
    return PackedDataset(
        indexed,
        seq_length=SEQ,
        num_samples=num_samples,
        seed=seed,
        eod_id=EOD,
        documents=documents,
        eod_mask_loss=eod_mask_loss,
        reset_position_ids=reset_position_ids,
        cache_dir=cache_dir,
        name=("train", "valid", "test")[split],
    )


def assert_same_samples(ours, theirs, n):
    """Samples 0..n-1 equal token for token, labels, position ids and loss masks included."""
    assert len(ours) == n and len(theirs) >= n
    for i in range(n):
        got, want = ours[i], theirs[i]
        for key in ("tokens", "labels", "position_ids", "loss_mask"):
            assert torch.equal(got[key], want[key].to(got[key].dtype)), (i, key)


def _tokens_per_epoch(prefix: str, split: int) -> int:
    indexed = MMapIndexedDataset(prefix)
    return int(indexed.sizes[split_documents(indexed.num_documents, SPLIT)[split]].sum())


# Sample counts as fractions of one epoch's samples: below one epoch, exactly one, several with a
# small last part (shuffled apart), several with a large last part (shuffled with the others).
CASES = {"part": 0.4, "one": 1.0, "separate_last": 3.2, "joint_last": 2.9}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("split", [0, 1, 2], ids=["train", "valid", "test"])
def test_single_dataset_matches_megatron(corpora, tmp_path, case, split):
    prefix = corpora[0]
    tokens = _tokens_per_epoch(prefix, split)
    per_epoch = samples_in(1, tokens, SEQ)
    n = per_epoch if case == "one" else int(CASES[case] * per_epoch)
    separate = samples_before_last_epoch(tokens, SEQ, n) is not None
    assert separate == (case == "separate_last")
    assert (epochs_needed(tokens, SEQ, n) == 1) == (case in ("part", "one"))
    sizes = [5, 5, 5]
    sizes[split] = n
    seed, mask, reset = 1234 + split, case != "one", case != "part"
    theirs = _megatron([prefix], None, sizes, seed, mask, reset)[split]
    ours = _ours(prefix, split, n, seed, mask, reset, cache_dir=tmp_path)
    np.testing.assert_array_equal(ours.doc_order, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    for name, theirs_name in (("doc_order", "document_index"), ("sample_index", "sample_index"),
                              ("shuffle_index", "shuffle_index")):  # fmt: skip
        assert getattr(ours, name).dtype == getattr(theirs, theirs_name).dtype, name
    assert_same_samples(ours, theirs, n)
    # The cached copy is the same dataset.
    again = _ours(prefix, split, n, seed, mask, reset, cache_dir=tmp_path)
    assert isinstance(again.shuffle_index, np.memmap)
    assert_same_samples(again, theirs, n)


def test_split_matches_megatron(corpora):
    for prefix in corpora:
        theirs = _megatron([prefix], None, [3, 3, 3], 1, False, False)
        num_docs = MMapIndexedDataset(prefix).num_documents
        for ours, dataset in zip(split_documents(num_docs, SPLIT), theirs, strict=True):
            np.testing.assert_array_equal(ours, dataset.indices)


@pytest.mark.parametrize(
    "weights,train,valid",
    [([0.3, 0.7], 90, 40), ([2.0, 1.0, 1.0], 150, 20), ([0.5, 0.25, 0.25], 400, 60)],
)
def test_blend_matches_megatron(corpora, weights, train, valid):
    prefixes = corpora[: len(weights)]
    seed = 7
    theirs = _megatron(prefixes, weights, [train, valid, 0], seed, True, True)
    for split, n in ((0, train), (1, valid)):
        components = [
            _ours(p, split, c, seed, True, True)
            for p, c in zip(prefixes, component_samples(weights, n), strict=True)
        ]
        ours = BlendedDataset(components, weights, n)
        mega = theirs[split]
        assert ours.dataset_index.dtype == np.int16
        np.testing.assert_array_equal(ours.dataset_index, mega.dataset_index[:n])
        np.testing.assert_array_equal(ours.dataset_sample_index, mega.dataset_sample_index[:n])
        for component, dataset in zip(components, mega.datasets, strict=True):
            assert component.num_samples == dataset.num_samples
        assert_same_samples(ours, mega, n)
