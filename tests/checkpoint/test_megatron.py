"""Megatron / Yuan 2.0 format: ours -> Megatron (tp2, pp3, uneven) -> ours -> HF -> ours is
lossless (weights and optimizer state) with identical logits and an identical continued run; a
checkpoint written the way the reference writes it imports; malicious pickles and wrong splits
are refused."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.tiny import tiny_overrides
from yuanlfa.checkpoint import latest_checkpoint, load_checkpoint
from yuanlfa.checkpoint.storage import read_tensor
from yuanlfa.checkpoint.torch_files import load_untrusted
from yuanlfa.cli.reshard import main as reshard
from yuanlfa.config import ModelConfig, config_from_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train import train

BLOCKS = [1, 3, 2]  # six layers on three stages, uneven


def _run(corpus: str, ckpt: Path, resume: bool = False) -> list[float]:
    cfg = tiny_overrides(
        corpus,
        model__num_layers=6,
        train__steps=5,
        train__exit_interval=0 if resume else 3,  # the first run stops (and saves) at step 3
        train__micro_batch_size=4,
        train__param_dtype="bf16",  # fp32 masters in the optimizer state
    )
    cfg["checkpoint"] = {"dir": str(ckpt), "resume": resume}
    return [r["loss"] for r in train(config_from_dict(cfg), progress=False).records]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: read_tensor(path, k) for k in keys}


def _assert_same(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, argparse.Namespace):
        _assert_same(vars(a), vars(b), where)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def _model(path: Path) -> tuple[ModelConfig, torch.nn.Module]:
    meta = json.loads((path / "meta.json").read_text())
    cfg = ModelConfig(**meta["model_config"])
    model = create_model(cfg, seed=0)
    parallel = config_from_dict({}).parallel
    load_checkpoint(path, model, None, meta["model_config"], build_mesh(parallel, 1, 0), cfg)
    return cfg, model


@pytest.mark.slow
def test_round_trip_through_megatron_and_hugging_face(small_corpus: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _run(small_corpus, ckpt)
    original = latest_checkpoint(ckpt)
    mega = tmp_path / "megatron"
    assert reshard(["--input", str(ckpt), "--output", str(mega), "--to", "megatron",
                    "--target-tp", "2", "--target-pp", "3", "--target-blocks", "1,3,2",
                    "--verify", "--quiet"]) == 0  # fmt: skip

    # The release's layout: directories, names, local layer indices, fc1 shards.
    assert (mega / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    files = sorted(p.relative_to(mega).as_posix() for p in mega.rglob("*.pt"))
    assert files == [
        f"iter_0000003/mp_rank_{t:02d}_{s:03d}/model_optim_rng.pt"
        for t in range(2)
        for s in range(3)
    ]
    first = load_untrusted(mega / "iter_0000003/mp_rank_00_000/model_optim_rng.pt")
    last = load_untrusted(mega / "iter_0000003/mp_rank_01_002/model_optim_rng.pt")
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 3
    assert first["args"].pipeline_model_parallel_blocks == BLOCKS
    assert "word_embeddings" in first["model"]["language_model"]["embedding"]
    encoder = last["model"]["language_model"]["encoder"]
    assert {k.split(".")[1] for k in encoder if k.startswith("layers.")} == {"0", "1"}
    assert "final_layernorm.weight" in encoder and "word_embeddings_for_head" in last["model"]
    fc1 = read_tensor(original, "model.layers.4.mlp.fc1.weight")  # stage 2, local layer 0
    f = fc1.shape[0] // 2
    mine = torch.cat([fc1[f // 2 : f], fc1[f + f // 2 :]])  # tp rank 1: [SiLU half; linear half]
    assert torch.equal(encoder["layers.0.mlp.dense_h_to_4h.weight"], mine)
    embed = read_tensor(original, "model.embed.weight")
    head = last["model"]["word_embeddings_for_head"]["weight"]
    assert torch.equal(head, embed[embed.shape[0] // 2 :])
    assert "fp32_from_fp16_params" in last["optimizer"]
    # What Yuan's load_checkpoint needs next to the optimizer state, from the run's settings
    # (tiny_overrides: lr 3e-3, 5 warmup steps, 8 samples per step, 3 steps taken).
    scheduler = last["opt_param_scheduler"]
    assert (scheduler["max_lr"], scheduler["lr_warmup_steps"], scheduler["num_steps"]) == (
        3e-3, 40, 24,
    )  # fmt: skip
    assert last["rng_state"][0]["rng_tracker_states"]["model-parallel-rng"].numel() == 16

    # Back to ours: every tensor, weights and optimizer state, is identical.
    back = tmp_path / "back"
    assert reshard(["--input", str(mega), "--output", str(back), "--to", "yuanlfa",
                    "--verify", "--quiet"]) == 0  # fmt: skip
    restored = latest_checkpoint(back)
    want, got = _tensors(original), _tensors(restored)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key

    # Megatron -> Megatron at another layout, then ours -> HF -> ours: still the same model.
    mega1 = tmp_path / "megatron_tp1"
    assert reshard(["--input", str(mega), "--output", str(mega1), "--to", "megatron",
                    "--target-tp", "1", "--target-pp", "1", "--quiet"]) == 0  # fmt: skip
    assert (mega1 / "iter_0000003/mp_rank_00/model_optim_rng.pt").is_file()
    # That went directly (each source byte read once); it writes what the way through our
    # format writes, optimizer state and args included.
    via_ours = tmp_path / "megatron_tp1_via_ours"
    assert reshard(["--input", str(back), "--output", str(via_ours), "--to", "megatron",
                    "--target-tp", "1", "--target-pp", "1", "--quiet"]) == 0  # fmt: skip
    file = "iter_0000003/mp_rank_00/model_optim_rng.pt"
    _assert_same(load_untrusted(mega1 / file), load_untrusted(via_ours / file), file)
    hf, again = tmp_path / "hf", tmp_path / "again"
    assert reshard(["--input", str(back), "--output", str(hf), "--to", "hf", "--dtype", "fp32",
                    "--quiet"]) == 0  # fmt: skip
    assert reshard(["--input", str(hf), "--output", str(again), "--to", "yuanlfa",
                    "--quiet"]) == 0  # fmt: skip
    cfg, reference = _model(original)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expected = reference(tokens)
        for path in (restored, latest_checkpoint(again)):
            torch.testing.assert_close(_model(path)[1](tokens), expected, rtol=0, atol=0)

    # The converted checkpoint resumes exactly like the original (optimizer state included).
    continued = _run(small_corpus, ckpt, resume=True)
    from_converted = _run(small_corpus, back, resume=True)
    assert len(continued) == 2 and from_converted == continued


def _reference_files(root: Path, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """tp2 x pp2 files [1, 2] the way the reference writes them, slicing by hand."""
    full = {n: p.detach() for n, p in model.named_parameters()}
    tp, blocks, f = 2, [1, 2], cfg.ffn_size
    names = {
        "input_norm.weight": "input_layernorm.weight",
        "attn.qk_proj.weight": "self_attention.get_query_key.weight",
        "attn.v_proj.weight": "self_attention.get_value.weight",
        "attn.lf_gate.conv1.weight": "self_attention.lf_gate.conv1.weight",
        "attn.lf_gate.conv1.bias": "self_attention.lf_gate.conv1.bias",
        "attn.lf_gate.conv2.weight": "self_attention.lf_gate.conv2.weight",
        "attn.lf_gate.conv2.bias": "self_attention.lf_gate.conv2.bias",
        "attn.lf_gate.norm.weight": "self_attention.lf_gate.output_layernorm.weight",
        "attn.o_proj.weight": "self_attention.dense.weight",
        "post_attn_norm.weight": "post_attention_layernorm.weight",
        "mlp.fc1.weight": "mlp.dense_h_to_4h.weight",
        "mlp.fc2.weight": "mlp.dense_4h_to_h.weight",
    }

    def rows(t: torch.Tensor, r: int) -> torch.Tensor:
        n = t.shape[0] // tp
        return t[r * n : (r + 1) * n].clone()

    def shard(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
        if name.endswith(("qk_proj.weight", "v_proj.weight")):
            return rows(t, r)
        if name.endswith(("o_proj.weight", "fc2.weight")):
            return rows(t.t(), r).t().contiguous()
        if name.endswith("fc1.weight"):
            return torch.cat([rows(t[:f], r), rows(t[f:], r)])
        return t.clone()

    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    for stage in range(2):
        for r in range(tp):
            encoder = {}
            first_layer = sum(blocks[:stage])
            for local in range(blocks[stage]):
                for ours, theirs in names.items():
                    name = f"layers.{first_layer + local}.{ours}"
                    encoder[f"layers.{local}.{theirs}"] = shard(name, full[name], r)
            language_model: dict = {"encoder": encoder}
            state = {
                "args": argparse.Namespace(
                    num_layers=3,
                    hidden_size=cfg.hidden_size,
                    ffn_hidden_size=f,
                    num_attention_heads=cfg.num_heads,
                    padded_vocab_size=cfg.vocab_size,
                    tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=2,
                    pipeline_model_parallel_blocks="1,2",
                    use_lf_gate=True,
                    params_dtype=torch.float32,
                    consumed_train_samples=56,
                    norm_epsilon=1e-6,
                ),  # fmt: skip
                "checkpoint_version": 3.0,
                "iteration": 7,
                "model": {"language_model": language_model},
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
                    }
                ],
            }
            if stage == 0:
                embed = rows(full["embed.weight"], r)
                language_model["embedding"] = {"word_embeddings": {"weight": embed}}
            else:
                encoder["final_layernorm.weight"] = full["final_norm.weight"].clone()
                head = rows(full["embed.weight"], r)
                state["model"]["word_embeddings_for_head"] = {"weight": head}
            path = root / "iter_0000007" / f"mp_rank_{r:02d}_{stage:03d}" / "model_optim_rng.pt"
            path.parent.mkdir(parents=True)
            torch.save(state, path)


def test_a_checkpoint_written_like_the_reference_imports(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {"model": {"num_layers": 3, "hidden_size": 64, "num_heads": 4, "vocab_size": 128}}
    ).model
    model = create_model(cfg, seed=3)
    src = tmp_path / "yuan"
    _reference_files(src, model, cfg)
    out = tmp_path / "ours"
    assert reshard(["--input", str(src), "--output", str(out), "--to", "yuanlfa",
                    "--verify", "--quiet"]) == 0  # fmt: skip
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())
    assert meta["step"] == 7 and meta["consumed_samples"] == 56
    assert meta["layout"]["pipeline_blocks"] == [1, 2] and meta["optimizer"] is None
    _, imported = _model(latest_checkpoint(out))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), model(tokens), rtol=0, atol=0)

    # A split that does not match the files is refused, naming the stage.
    wrong = tmp_path / "wrong"
    assert reshard(["--input", str(src), "--output", str(wrong), "--to", "yuanlfa",
                    "--blocks", "2,1", "--quiet"]) == 2  # fmt: skip
    assert not wrong.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    path = src / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    (src / "latest_checkpointed_iteration.txt").write_text("1")
    torch.save({"args": argparse.Namespace(), "model": {}, "payload": _Evil(marker)}, path)
    out = tmp_path / "out"
    assert reshard(["--input", str(src), "--output", str(out), "--to", "yuanlfa"]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "system" in err
    assert not marker.exists() and not out.exists()
