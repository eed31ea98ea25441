"""Hugging Face Yuan 2.0 conversion: ours -> HF -> ours is lossless and gives identical
logits, the HF tensors compute what the public format says, outputs are never overwritten
without --force, and training can start from an imported checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.launcher import run_distributed
from tests.tiny import tiny_overrides
from yuanlfa.checkpoint import latest_checkpoint, load_checkpoint
from yuanlfa.checkpoint.convert.hf import _HFReader
from yuanlfa.checkpoint.storage import read_tensor
from yuanlfa.cli.reshard import main as reshard
from yuanlfa.config import ModelConfig, config_from_dict, config_to_dict
from yuanlfa.model import create_model
from yuanlfa.parallel import build_mesh
from yuanlfa.train import train


def _trained_checkpoint(rank: int, world: int, corpus: str, ckpt: str) -> None:
    # A 4-process tp2 x pp2 run with bf16 parameters: masters, shards and stages to gather.
    cfg = tiny_overrides(
        corpus,
        model__num_layers=3,
        train__steps=3,
        train__micro_batch_size=2,
        parallel__tp=2,
        parallel__pp=2,
        parallel__pipeline_blocks=[1, 2],
        train__param_dtype="bf16",
    )
    cfg["checkpoint"] = {"dir": ckpt}
    train(config_from_dict(cfg), progress=False)


def _load(path: Path) -> tuple[ModelConfig, torch.nn.Module]:
    meta = json.loads((path / "meta.json").read_text())
    cfg = ModelConfig(**meta["model_config"])
    model = create_model(cfg, seed=0)
    load_checkpoint(path, model, None, meta["model_config"], build_mesh(_parallel(), 1, 0), cfg)
    return cfg, model


def _parallel():
    return config_from_dict({}).parallel


@pytest.mark.slow
def test_round_trip_through_hugging_face_is_lossless(small_corpus: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_distributed(_trained_checkpoint, 4, small_corpus, str(ckpt), timeout=600)
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert reshard(["--input", str(ckpt), "--output", str(hf), "--to", "hf", "--verify",
                    "--dtype", "fp32", "--quiet"]) == 0  # fmt: skip
    assert reshard(["--input", str(hf), "--output", str(back), "--to", "yuanlfa", "--verify",
                    "--quiet"]) == 0  # fmt: skip
    cfg, original = _load(latest_checkpoint(ckpt))
    _, restored = _load(latest_checkpoint(back))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens), original(tokens), rtol=0, atol=0)
    # The fp32 export holds the fp32 master weights, not the bf16-rounded parameters.
    master = read_tensor(latest_checkpoint(ckpt), "optim.layers.0.attn.v_proj.weight.master")
    assert master.dtype == torch.float32
    torch.testing.assert_close(restored.layers["0"].attn.v_proj.weight, master, rtol=0, atol=0)

    # The HF tensors compute what the public format says, from our model's own modules.
    reader = _HFReader(hf)
    x = torch.randn(5, cfg.hidden_size)
    layer = original.layers["1"]
    with torch.no_grad():
        q = x @ reader.get("model.layers.1.self_attn.q_proj.weight").t()
        k = x @ reader.get("model.layers.1.self_attn.k_proj.weight").t()
        torch.testing.assert_close(torch.cat([q, k], -1), layer.attn.qk_proj(x))
        up = x @ reader.get("model.layers.1.mlp.up_proj.weight").t()
        gate = x @ reader.get("model.layers.1.mlp.gate_proj.weight").t()
        down = reader.get("model.layers.1.mlp.down_proj.weight")
        torch.testing.assert_close((gate * F.silu(up)) @ down.t(), layer.mlp(x))
    assert torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight"))
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["intermediate_size"] == cfg.ffn_size

    # Training starts from the imported weights (not from scratch).
    fresh = tiny_overrides(small_corpus, model__num_layers=3, train__steps=1)
    start = train(config_from_dict(fresh), progress=False).records[0]["loss"]
    fresh["checkpoint"] = {"init_from": str(back)}
    warm = train(config_from_dict(fresh), progress=False).records[0]["loss"]
    assert warm < start - 0.1


def test_outputs_are_never_overwritten_without_force(tmp_path: Path, capsys) -> None:
    cfg = config_from_dict(
        {"model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}}
    )
    from yuanlfa.checkpoint import TrainingState, save_checkpoint
    from yuanlfa.train.optimizer import build_optimizer

    model = create_model(cfg.model, seed=1)
    state = TrainingState(1, 0, config_to_dict(cfg.model), {})
    save_checkpoint(
        tmp_path / "ckpt", model, build_optimizer(model, cfg.optim), state,
        build_mesh(cfg.parallel, 1, 0), cfg.model, {},
    )  # fmt: skip
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--input", str(tmp_path / "ckpt"), "--output", str(out), "--to", "hf", "--quiet"]
    assert reshard(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert reshard([*args, "--force", "--verify"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert reshard(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"),
                    "--to", "hf"]) == 2  # fmt: skip
