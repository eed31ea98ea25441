"""A YuanForCausalLM-style reader for tests: Yuan 2.0's HF modeling code
(``megatron/model/yuan_hf_model.py`` of IEIT-Yuan/Yuan-2.0), rewritten as plain functions.

It reads ONLY the directory: ``config.json`` (every attribute Yuan's code reads, a missing one is
an error as it is there) and the safetensors weights. No value comes from the library or the
test. What Yuan's code hard-codes is hard-coded here the same way: the RoPE base 10000 (its
``LlamaRotaryEmbedding`` is built without a base) and the LFA output norm's epsilon 1e-6 (its
``LocalizedFiltering`` builds ``LlamaRMSNorm(hidden)``). The forward pass is its eval path
without a cache: the mask of ``_prepare_decoder_attention_mask_training`` when
``reset_position_ids`` is set (positions are not reset there: its result is discarded), else the
causal mask; eager attention, or causal-only when ``use_flash_attention`` (the flash path ignores
masks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# Every config attribute Yuan 2.0's YuanForCausalLM / LlamaModel / LlamaAttention /
# LlamaDecoderLayer reads as ``config.<name>`` (use_shareqk is read inside try/except there).
YUAN_READS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
    "initializer_range", "pad_token_id", "tie_word_embeddings", "causal_mask",
    "use_flash_attention", "eod_token", "sep_token", "use_loss_mask", "reset_attention_mask",
    "reset_position_ids", "use_cache",
)  # fmt: skip


def read_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    missing = [k for k in YUAN_READS if k not in config]
    if missing:
        raise AttributeError(f"config.json lacks {missing}: YuanForCausalLM reads them")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index.values())):
        out.update(load_file(str(path / file)))
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _lfa(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """LocalizedFiltering._train_forward / first-step inference: x [b, s, h]."""
    b, s, h = x.shape
    inputs = x.transpose(0, 1).reshape(s, 1, b, h).permute(2, 3, 0, 1)  # [b, h, s, 1]
    out1 = F.conv2d(inputs, p[prefix + "conv1.weight"], p[prefix + "conv1.bias"], padding=(1, 0))
    out1 = out1[:, :, :s, :]
    out2 = F.conv2d(out1, p[prefix + "conv2.weight"], p[prefix + "conv2.bias"], padding=(1, 0))
    out2 = out2[:, :, :s, :].permute(2, 3, 0, 1).reshape(s, b, h).transpose(0, 1)
    return _rms(out2 + x, p[prefix + "output_layernorm.weight"], 1e-6)  # hard-coded eps


def _mask(ids: torch.Tensor, config: dict) -> torch.Tensor:
    b, s = ids.shape
    mask = torch.tril(torch.ones(b, 1, s, s))
    if config["reset_position_ids"] and config["reset_attention_mask"]:
        for i in range(b):
            for j in (ids[i] == config["eod_token"]).nonzero().flatten().tolist():
                mask[i, 0, j + 1 :, : j + 1] = 0
    return mask.bool()


def yuan_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of the exported model as Yuan's code computes them (fp32)."""
    config = read_config(path)
    p = {k: v.float() for k, v in read_weights(path).items()}
    assert config["hidden_act"] == "silu"
    h, heads = config["hidden_size"], config["num_attention_heads"]
    d = h // heads
    eps = config["rms_norm_eps"]
    b, s = ids.shape
    x = F.embedding(ids, p["model.embed_tokens.weight"])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # base hard-coded
    freqs = torch.outer(torch.arange(s).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    # The flash path is causal and ignores the mask.
    flash = config["use_flash_attention"]
    mask = _mask(ids, {**config, "reset_attention_mask": False} if flash else config)
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        res = x
        x = _rms(x, p[pre + "input_layernorm.weight"], eps)
        v = (x @ p[pre + "self_attn.v_proj.weight"].t()).view(b, s, heads, d).transpose(1, 2)
        f = _lfa(x, p, pre + "self_attn.lf_gate.")
        q = f @ p[pre + "self_attn.q_proj.weight"].t()
        k = f @ p[pre + "self_attn.k_proj.weight"].t()
        qk = torch.cat([q, k], dim=-1).view(b, s, heads, 2 * d)
        q, k = (t.transpose(1, 2) for t in torch.chunk(qk, 2, dim=-1))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = q @ k.transpose(2, 3) / math.sqrt(d)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) @ v
        x = res + attn.transpose(1, 2).reshape(b, s, h) @ p[pre + "self_attn.o_proj.weight"].t()
        res = x
        x = _rms(x, p[pre + "post_attention_layernorm.weight"], eps)
        up = x @ p[pre + "mlp.up_proj.weight"].t()
        gate = x @ p[pre + "mlp.gate_proj.weight"].t()
        x = res + (gate * F.silu(up)) @ p[pre + "mlp.down_proj.weight"].t()
    x = _rms(x, p["model.norm.weight"], eps)
    # transformers ties lm_head to the embedding when tie_word_embeddings is true.
    head = p["model.embed_tokens.weight"] if config["tie_word_embeddings"] else p["lm_head.weight"]
    return x @ head.t()
