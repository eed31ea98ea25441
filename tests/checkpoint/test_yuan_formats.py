"""The HF and Megatron formats as Yuan 2.0's own code reads them (issue 16, items 3-7).

- An HF export loads in a YuanForCausalLM-style reader (tests/checkpoint/yuan_reader.py) that
  reads only config.json and the weights, and computes the library's logits; its tokenizer files
  load in transformers and encode as the run's tokenizer did.
- What Yuan's code cannot reproduce is refused before anything is written.
- Released-style HF directories (Yuan's config.json fields, tied head without lm_head.weight,
  pytorch_model.bin with RoPE buffers) import; an untied head imports as one; unknown tensors
  are errors.
- Megatron: an untied head imports faithfully, an unmapped tensor and a differing tied-head copy
  are errors; exports carry rng_state as Yuan's load_checkpoint reads it.
- torch_files writes storages, not data pointers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.checkpoint.yuan_reader import YUAN_READS, yuan_logits
from yuanlfa.checkpoint import latest_checkpoint, manifest
from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.convert import export_hf, export_megatron, import_hf, import_megatron
from yuanlfa.checkpoint.convert.common import write_ours
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.storage import read_tensor
from yuanlfa.checkpoint.torch_files import Pending, load_untrusted, save_streaming
from yuanlfa.cli.reshard import main as reshard
from yuanlfa.config import ModelConfig, config_to_dict
from yuanlfa.data.special_tokens import YUAN_SPECIAL_TOKENS
from yuanlfa.data.spm import SentencePieceTokenizer
from yuanlfa.model import create_model

YUAN_DIR = Path(__file__).parents[1] / "data" / "yuan_tokenizer"
YUAN_SPM = f"sentencepiece:{YUAN_DIR / 'tokenizer.model'}"
EOD, SEP = 77185, 77187  # Yuan 2.0's, from its released config.json files


def _model_cfg(**overrides: Any) -> ModelConfig:
    base = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 135040}
    return ModelConfig(**{**base, **overrides})


def _model(cfg: ModelConfig, seed: int = 3) -> torch.nn.Module:
    """A model whose every parameter (norm weights and conv biases too) is off its init, so
    a norm, epsilon or bias read wrongly shows in the logits."""
    model = create_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _checkpoint(root: Path, cfg: ModelConfig, model: torch.nn.Module, run: dict) -> Path:
    """Our checkpoint of ``model`` with ``run`` as its saved run config (data, train...)."""
    tensors = [
        LazyTensor(manifest.model_key(n), tuple(p.shape), p.dtype, lambda p=p: p.detach().clone())
        for n, p in model.named_parameters()
    ]
    state = manifest.TrainingState(5, 40, config_to_dict(cfg), {"config": run})
    write_ours(root, tensors, state, {"source": "test"}, None, force=False, progress=False)
    return root


def _load_ours(root: Path) -> torch.nn.Module:
    path = latest_checkpoint(root)
    cfg = manifest.model_config(manifest.read_meta(path))
    model = create_model(cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(read_tensor(path, manifest.model_key(name)))
    return model.eval()


RUN = {
    "data": {"tokenizer": YUAN_SPM, "sft": True, "reset_position_ids": True},
    "train": {"seq_length": 48, "seed": 11},
}


def _ids(vocab: int = 134958) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    if vocab > SEP:  # documents and a separator in the sample
        ids[0, 6], ids[1, 9], ids[0, 3] = EOD, EOD, SEP
    return ids


# --- HF export: Yuan's reader, tokenizer files -------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_hf_export_reads_in_yuans_code_with_the_librarys_logits(tmp_path: Path, tied) -> None:
    cfg = _model_cfg(tie_embeddings=tied)
    model = _model(cfg)
    out = tmp_path / "hf"
    export_hf(_checkpoint(tmp_path / "ours", cfg, model, RUN), out, progress=False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(yuan_logits(out, ids), model(ids), rtol=1e-5, atol=1e-5)
    # The values describe the run: its tokenizer's ids, its sequence length, its SFT masks.
    config = json.loads((out / "config.json").read_text())
    assert set(YUAN_READS) <= set(config)
    assert (config["eod_token"], config["sep_token"], config["pad_token_id"]) == (EOD, SEP, 77188)
    assert config["max_position_embeddings"] == 48 and config["use_loss_mask"] is True
    assert config["tie_word_embeddings"] is tied and config["model_type"] == "yuan"
    # The untied head is exported as itself; the tied one as a copy of the embedding.
    back = tmp_path / "back"
    import_hf(out, back, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_load_ours(back)(ids), model(ids), rtol=0, atol=0)


def test_hf_export_carries_the_runs_tokenizer_as_transformers_loads_it(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = _model_cfg()
    out = tmp_path / "hf"
    export_hf(_checkpoint(tmp_path / "ours", cfg, _model(cfg), RUN), out, progress=False)
    tok = transformers.LlamaTokenizer.from_pretrained(str(out))
    ours = SentencePieceTokenizer(YUAN_DIR / "tokenizer.model")
    cases = json.loads((YUAN_DIR / "ids_transformers_4_31_0.json").read_text())["cases"]
    texts = [text for text, _ in cases]
    assert len(texts) > 100
    for text in texts:
        assert tok.encode(text) == ours.encode(text), text
    assert len(tok) == ours.vocab_size == 134958
    for token in YUAN_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) == ours.token_to_id(token), token
    assert tok.eos_token_id == EOD
    assert tok.decode([134953, 134957], spaces_between_special_tokens=False) == "<mask><FIM_MIDDLE>"


def test_hf_export_carries_any_sentencepiece_tokenizer_with_its_appended_ids(
    tmp_path: Path,
) -> None:
    """A model without Yuan's specials (they are appended after its pieces): transformers,
    loading the exported files, gives the run's ids for them and for every text."""
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "in.txt"
    corpus.write_text((Path(spm.__file__).parent / "__init__.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "own"), vocab_size=300, minloglevel=2
    )
    spec = f"sentencepiece:{tmp_path / 'own.model'}"
    cfg = _model_cfg(vocab_size=384)
    run = {"data": {"tokenizer": spec}, "train": {"seq_length": 32}}
    out = tmp_path / "hf"
    export_hf(_checkpoint(tmp_path / "ours", cfg, _model(cfg), run), out, progress=False)
    tok = transformers.LlamaTokenizer.from_pretrained(str(out))
    ours = SentencePieceTokenizer(tmp_path / "own.model")
    config = json.loads((out / "config.json").read_text())
    assert (config["eod_token"], config["sep_token"]) == (ours.eod, ours.sep) == (300, 301)
    for token in YUAN_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) == ours.token_to_id(token), token
    cases = json.loads((YUAN_DIR / "ids_transformers_4_31_0.json").read_text())["cases"]
    for text, _ in cases:
        assert tok.encode(text) == ours.encode(text), text


# --- refusals ----------------------------------------------------------------------------------

REFUSED = [
    ({"rope_base": 500000.0}, "model.rope_base is 500000 (Yuan's code: 10000)"),
    ({"norm_eps": 1e-5}, "model.norm_eps is 1e-05 (Yuan's code: 1e-06"),
    ({"filter": "conv", "filter_kernel": 3}, "model.filter is 'conv'"),
    ({"lfa": False}, "model.filter is 'none' (Yuan's Hugging Face code has lfa only)"),
    ({"lfa_reset_at_doc_start": True}, "model.lfa_reset_at_doc_start is true"),
    ({"document_attention": True, "lfa_reset_at_doc_start": True}, "model.document_attention"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_hf_export_refuses_what_yuans_code_cannot_reproduce(
    tmp_path: Path, overrides, message
) -> None:
    cfg = _model_cfg(vocab_size=256, **overrides)
    src = _checkpoint(tmp_path / "ours", cfg, _model(cfg), {})
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError) as err:
        export_hf(src, out, progress=False)
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # nothing written


def test_megatron_export_refuses_what_yuans_code_cannot_reproduce(tmp_path: Path, capsys) -> None:
    cfg = _model_cfg(vocab_size=256, rope_base=500000.0, norm_eps=1e-5)
    src = _checkpoint(tmp_path / "ours", cfg, _model(cfg), {})
    out = tmp_path / "mega"
    args = ["--input", str(src), "--output", str(out), "--to", "megatron", "--target-tp", "1",
            "--target-pp", "1", "--quiet"]  # fmt: skip
    assert reshard(args) == 2
    err = capsys.readouterr().err
    assert "model.rope_base is 500000" in err and "model.norm_eps is 1e-05" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


# --- HF import of released-style directories ------------------------------------------------------


def _released_config(cfg: ModelConfig, tied: bool = True) -> dict:
    """A config.json with the released files' fields (Yuan2-2B-hf's, scaled down), including
    ones this library never writes."""
    return {
        "_from_model_config": True,
        "architectures": ["YuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_yuan.YuanConfig",
            "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM",
        },
        "tokenizer_class": "YuanTokenizer",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": 8192,
        "model_type": "yuan",
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "rms_norm_eps": 1e-06,
        "dropout": 0.1,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "transformers_version": "4.30.0.dev0",
        "use_cache": True,
        "causal_mask": True,
        "use_flash_attention": False,
        "reset_attention_mask": True,
        "reset_position_ids": True,
        "use_loss_mask": False,
        "eod_token": EOD,
        "sep_token": SEP,
        "eod_token_id": EOD,
        "sep_token_id": EOD,
        "pad_token_id": EOD,
        "bos_token_id": EOD,
        "eos_token_id": EOD,
        "mask_token_id": EOD,
        "vocab_size": cfg.vocab_size,
    }


def _hf_tensors(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors under the public HF names, split by hand."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": None}
    out["model.norm.weight"] = model.final_norm.weight
    h, f = cfg.hidden_size, cfg.ffn_size
    for i, layer in model.layers.items():
        pre = f"model.layers.{i}."
        a = layer.attn
        qk = a.qk_proj.weight
        fc1 = layer.mlp.fc1.weight
        out |= {
            pre + "input_layernorm.weight": layer.input_norm.weight,
            pre + "post_attention_layernorm.weight": layer.post_attn_norm.weight,
            pre + "self_attn.q_proj.weight": qk[:h],
            pre + "self_attn.k_proj.weight": qk[h:],
            pre + "self_attn.v_proj.weight": a.v_proj.weight,
            pre + "self_attn.o_proj.weight": a.o_proj.weight,
            pre + "self_attn.lf_gate.conv1.weight": a.lf_gate.conv1.weight,
            pre + "self_attn.lf_gate.conv1.bias": a.lf_gate.conv1.bias,
            pre + "self_attn.lf_gate.conv2.weight": a.lf_gate.conv2.weight,
            pre + "self_attn.lf_gate.conv2.bias": a.lf_gate.conv2.bias,
            pre + "self_attn.lf_gate.output_layernorm.weight": a.lf_gate.norm.weight,
            pre + "mlp.up_proj.weight": fc1[:f],
            pre + "mlp.gate_proj.weight": fc1[f:],
            pre + "mlp.down_proj.weight": layer.mlp.fc2.weight,
        }
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    index = {"weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config))


def test_a_released_style_hf_directory_imports(tmp_path: Path) -> None:
    cfg = _model_cfg(vocab_size=512)
    model = _model(cfg)
    ids = _ids(512)
    # Tied, no lm_head.weight, safetensors: the logits of Yuan's reader and of the import agree.
    src = tmp_path / "released"
    _write_safetensors(src, _hf_tensors(model, cfg), _released_config(cfg))
    import_hf(src, tmp_path / "a", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_load_ours(tmp_path / "a")(ids), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(yuan_logits(src, ids), model(ids), rtol=1e-5, atol=1e-5)

    # pytorch_model.bin with an equal lm_head.weight and Yuan's persistent RoPE buffers.
    binary = tmp_path / "released_bin"
    binary.mkdir()
    tensors = _hf_tensors(model, cfg) | {"lm_head.weight": model.embed.weight.detach().clone()}
    d = cfg.head_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    for i in range(cfg.num_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(tensors, binary / "pytorch_model.bin")
    (binary / "config.json").write_text(json.dumps(_released_config(cfg)))
    assert reshard(["--input", str(binary), "--output", str(tmp_path / "b"), "--to", "yuanlfa",
                    "--verify", "--quiet"]) == 0  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(_load_ours(tmp_path / "b")(ids), model(ids), rtol=0, atol=0)

    # RoPE buffers of another base: Yuan's code has none, so the file is not what it says.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq**1.1
    torch.save(tensors, binary / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not RoPE base 10000's"):
        import_hf(binary, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_an_untied_hf_head_imports_as_one_and_unknown_tensors_are_errors(tmp_path: Path) -> None:
    cfg = _model_cfg(vocab_size=512, tie_embeddings=False)
    model = _model(cfg)
    ids = _ids(512)
    tensors = _hf_tensors(model, cfg) | {"lm_head.weight": model.output.weight.detach().clone()}
    src = tmp_path / "untied"
    _write_safetensors(src, tensors, _released_config(cfg, tied=False))
    import_hf(src, tmp_path / "a", progress=False)
    imported = _load_ours(tmp_path / "a")
    assert imported.cfg.tie_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(imported(ids), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(yuan_logits(src, ids), model(ids), rtol=1e-5, atol=1e-5)

    # The same head under a config that ties it: transformers would drop it; refused.
    tied = tmp_path / "tied_but_differs"
    _write_safetensors(tied, tensors, _released_config(cfg, tied=True))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        import_hf(tied, tmp_path / "b", progress=False)

    extra = tmp_path / "extra"
    _write_safetensors(extra, tensors | {"model.layers.0.mystery.weight": torch.ones(3)},
                       _released_config(cfg, tied=False))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mystery\.weight"):
        import_hf(extra, tmp_path / "c", progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# --- Megatron ----------------------------------------------------------------------------------

MEGATRON_NAMES = {
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


def _yuan_megatron(
    root: Path,
    model: torch.nn.Module,
    cfg: ModelConfig,
    *,
    untie_arg: bool,
    head: torch.Tensor | None = None,
    extra: str | None = None,
) -> Path:
    """tp1 x pp2 files [1, 1] as Yuan 2.0's Megatron code saves them, written by hand: the last
    stage holds ``output_layer`` (untied) or the tied copy ``head`` (default: the embedding)."""
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    for stage in range(2):
        encoder = {
            f"layers.0.{theirs}": full[f"layers.{stage}.{ours}"]
            for ours, theirs in MEGATRON_NAMES.items()
        }
        language_model: dict = {"encoder": encoder}
        state: dict = {
            "args": argparse.Namespace(
                num_layers=2,
                hidden_size=cfg.hidden_size,
                ffn_hidden_size=cfg.ffn_size,
                num_attention_heads=cfg.num_heads,
                padded_vocab_size=cfg.vocab_size,
                tensor_model_parallel_size=1,
                pipeline_model_parallel_size=2,
                use_lf_gate=True,
                untie_embeddings_and_output_weights=untie_arg,
            ),  # fmt: skip
            "checkpoint_version": 3.0,
            "iteration": 4,
            "model": {"language_model": language_model},
        }
        if stage == 0:
            language_model["embedding"] = {"word_embeddings": {"weight": full["embed.weight"]}}
        else:
            encoder["final_layernorm.weight"] = full["final_norm.weight"]
            if "output.weight" in full:
                language_model["output_layer"] = {"weight": full["output.weight"]}
            else:
                copy = full["embed.weight"] if head is None else head
                state["model"]["word_embeddings_for_head"] = {"weight": copy}
            if extra is not None:
                encoder[extra] = torch.zeros(2)
        path = root / "iter_0000004" / f"mp_rank_00_{stage:03d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save(state, path)
    return root


def test_an_untied_megatron_head_imports_faithfully(tmp_path: Path) -> None:
    cfg = _model_cfg(vocab_size=256, tie_embeddings=False)
    model = _model(cfg)
    src = _yuan_megatron(tmp_path / "yuan", model, cfg, untie_arg=True)
    assert reshard(["--input", str(src), "--output", str(tmp_path / "ours"), "--to", "yuanlfa",
                    "--verify", "--quiet"]) == 0  # fmt: skip
    imported = _load_ours(tmp_path / "ours")
    assert imported.cfg.tie_embeddings is False
    ids = _ids(256)
    with torch.no_grad():
        torch.testing.assert_close(imported(ids), model(ids), rtol=0, atol=0)
    # And back to Megatron: the head is output_layer on the last stage, no tied copy.
    mega = tmp_path / "mega"
    export_megatron(tmp_path / "ours", mega, tp=1, pp=2, progress=False)
    last = load_untrusted(mega / "iter_0000004/mp_rank_00_001/model_optim_rng.pt")
    assert last["args"].untie_embeddings_and_output_weights is True
    head = last["model"]["language_model"]["output_layer"]["weight"]
    assert torch.equal(head, model.output.weight)
    assert "word_embeddings_for_head" not in last["model"]


def test_megatron_tensors_without_a_place_are_errors(tmp_path: Path, capsys) -> None:
    untied = _model_cfg(vocab_size=256, tie_embeddings=False)
    # An untied checkpoint whose args do not say so: the head would be dropped.
    src = _yuan_megatron(tmp_path / "a", _model(untied), untied, untie_arg=False)
    with pytest.raises(CheckpointError, match="language_model.output_layer.weight.*untied"):
        import_megatron(src, tmp_path / "out_a", progress=False)
    # A tensor the model has no place for.
    tied = _model_cfg(vocab_size=256)
    model = _model(tied)
    extra = "layers.0.self_attention.rotary_mystery.weight"
    src = _yuan_megatron(tmp_path / "b", model, tied, untie_arg=False, extra=extra)
    assert reshard(["--input", str(src), "--output", str(tmp_path / "out_b"), "--to",
                    "yuanlfa", "--quiet"]) == 2  # fmt: skip
    assert f"language_model.encoder.{extra}" in capsys.readouterr().err
    # A tied head copy that differs from the embedding.
    head = model.embed.weight.detach().clone()
    head[5, 0] += 1.0
    src = _yuan_megatron(tmp_path / "c", model, tied, untie_arg=False, head=head)
    with pytest.raises(CheckpointError, match="word_embeddings_for_head.weight differs"):
        import_megatron(src, tmp_path / "out_c", progress=False)
    assert not any((tmp_path / f"out_{x}").exists() for x in "abc")


class _NoCuda:
    """What Yuan's loader calls on torch.cuda, checking the state as CUDA would (16 bytes:
    the Philox seed and offset), or the real thing on a GPU machine."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def set_rng_state(self, state: torch.Tensor) -> None:
        assert state.dtype == torch.uint8 and state.numel() == 16
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state)
        self.states.append(state)


def _yuan_load_rng(state_dict: dict, cuda: _NoCuda) -> dict:
    """The rng block of Yuan 2.0's load_checkpoint (megatron/checkpointing.py), without
    --data-parallel-random-init; a KeyError there makes it exit."""
    rng_state = state_dict["rng_state"][0]
    random.setstate(rng_state["random_rng_state"])
    np.random.set_state(rng_state["np_rng_state"])
    torch.set_rng_state(rng_state["torch_rng_state"])
    cuda.set_rng_state(rng_state["cuda_rng_state"])
    if not rng_state["rng_tracker_states"]:
        raise KeyError
    for state in rng_state["rng_tracker_states"].values():  # CudaRNGStatesTracker.set_states
        cuda.set_rng_state(state)
    return rng_state


def test_megatron_export_writes_rng_state_as_yuans_loader_reads_it(tmp_path: Path) -> None:
    cfg = _model_cfg(vocab_size=256)
    src = _checkpoint(tmp_path / "ours", cfg, _model(cfg), RUN)
    mega = tmp_path / "mega"
    export_megatron(src, mega, tp=2, pp=2, progress=False)
    for tp_rank in range(2):
        for pp_rank in range(2):
            file = mega / f"iter_0000005/mp_rank_{tp_rank:02d}_{pp_rank:03d}/model_optim_rng.pt"
            # Yuan's code runs torch.load without weights_only; ours through the allow-list.
            state = torch.load(file, weights_only=False)
            cuda = _NoCuda()
            _yuan_load_rng(state, cuda)
            # The states of Yuan's _set_random_seed for this rank (seed 11 + 100 * pp_rank).
            seed = 11 + 100 * pp_rank
            assert random.random() == random.Random(seed).random()
            assert np.random.rand() == np.random.RandomState(seed).rand()
            fresh = torch.Generator().manual_seed(seed)
            assert torch.equal(torch.rand(3), torch.rand(3, generator=fresh))
            seeds = [int.from_bytes(bytes(s[:8].tolist()), "little") for s in cuda.states]
            assert seeds == [seed, seed + 2718 + tp_rank]
            # What check_checkpoint_args compares, present and as Yuan's scripts set them.
            args = state["args"]
            assert args.add_position_embedding is False
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
            assert load_untrusted(file)["rng_state"][0]["rng_tracker_states"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_exported_cuda_rng_states_equal_what_cuda_gives(tmp_path: Path) -> None:
    from yuanlfa.checkpoint.convert.megatron import rng_state

    state = rng_state(1234, 1, 2)[0]
    torch.cuda.manual_seed(1234 + 200)
    assert torch.equal(state["cuda_rng_state"].load(), torch.cuda.get_rng_state())
    torch.cuda.set_rng_state(state["rng_tracker_states"]["model-parallel-rng"].load())
    torch.cuda.manual_seed(1234 + 200 + 2718 + 1)
    assert torch.equal(
        state["rng_tracker_states"]["model-parallel-rng"].load(), torch.cuda.get_rng_state()
    )


# --- torch_files ---------------------------------------------------------------------------------


def test_streaming_writes_storages_not_data_pointers(tmp_path: Path, capfd) -> None:
    big = torch.arange(1000, dtype=torch.float32)
    view = big[100:300]  # a contiguous view inside a larger storage: written without a copy
    path = tmp_path / "f.pt"
    objs = {"view": Pending((200,), torch.float32, lambda: view),
            "empty": Pending((0,), torch.bfloat16, lambda: torch.empty(0, dtype=torch.bfloat16)),
            "whole": Pending((2, 3), torch.int64, lambda: torch.arange(6).view(2, 3))}  # fmt: skip
    save_streaming([(objs, path)])
    assert "deprecated" not in capfd.readouterr().err
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["view"], view) and loaded["empty"].numel() == 0
    assert torch.equal(loaded["whole"], torch.arange(6).view(2, 3))
