"""Conversion between our checkpoints and the Hugging Face Yuan 2.0 layout (weights only).

Names and splits are the public format's (DESIGN.md 3): q_proj / k_proj are the first and
second halves (rows) of our fused per-head [q; k] projection, up_proj (the SiLU branch) and
gate_proj the two halves of fc1, ``lm_head.weight`` a copy of the tied embedding. Tensors are
streamed one at a time: the export holds at most one output shard, the import one tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from yuanlfa.checkpoint import manifest
from yuanlfa.checkpoint.convert.common import (
    model_config_dict,
    model_config_from_dict,
    prepare_output,
    read_source,
    replace_output,
    require_release_architecture,
    verify_weights,
    weight_keys,
    write_ours,
)
from yuanlfa.checkpoint.dcp_direct import read_tensor
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.planners import LazyTensor
from yuanlfa.checkpoint.storage import stored_tensors
from yuanlfa.config import ModelConfig
from yuanlfa.model import build_model

INDEX = "model.safetensors.index.json"
HF_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise CheckpointError(
            "the Hugging Face format needs the safetensors package: pip install safetensors "
            '(or pip install -e ".[hf]")'
        ) from None
    return st


def hf_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int]]:
    """The HF tensors our parameter ``name`` is made of, concatenated along rows in order:
    ``(hf_name, rows)``."""
    h, f = cfg.hidden_size, cfg.ffn_size
    if name == "embed.weight":
        return [("model.embed_tokens.weight", cfg.vocab_size)]
    if name == "final_norm.weight":
        return [("model.norm.weight", h)]
    if not name.startswith("layers."):
        raise CheckpointError(f"no Hugging Face name for parameter {name!r}")
    _, index, rest = name.split(".", 2)
    prefix = f"model.layers.{index}."
    simple = {
        "input_norm.weight": "input_layernorm.weight",
        "post_attn_norm.weight": "post_attention_layernorm.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "attn.lf_gate.norm.weight": "self_attn.lf_gate.output_layernorm.weight",
        "mlp.fc2.weight": "mlp.down_proj.weight",
    }
    if rest in simple:
        return [(prefix + simple[rest], -1)]
    if rest.startswith("attn.lf_gate.conv"):
        return [(prefix + "self_attn." + rest.removeprefix("attn."), -1)]
    if rest == "attn.qk_proj.weight":
        return [(prefix + "self_attn.q_proj.weight", h), (prefix + "self_attn.k_proj.weight", h)]
    if rest == "mlp.fc1.weight":
        return [(prefix + "mlp.up_proj.weight", f), (prefix + "mlp.gate_proj.weight", f)]
    raise CheckpointError(f"no Hugging Face name for parameter {name!r}")


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["YuanForCausalLM"],
        "model_type": "yuan",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,  # the HF model stores lm_head as its own copy
        "use_lfa": cfg.lfa,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Our full model config, so that a round trip restores it exactly.
        "yuanlfa_model_config": model_config_dict(cfg),
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    if "yuanlfa_model_config" in config:
        return model_config_from_dict(config["yuanlfa_model_config"])
    return ModelConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rope_base=config.get("rope_theta", 10000.0),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        lfa=config.get("use_lfa", True),
    )


ST_NAMES = {v: k for k, v in HF_DTYPES.items()}


def write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterator
) -> None:
    """A safetensors file written as a stream: the header (names, dtypes, shapes, offsets) is
    known from ``entries`` up front, then each tensor of ``tensors`` (in ``entries`` order) is
    appended as it comes, so only one is in memory. Same bytes as ``safetensors.save_file``'s
    layout: u64 header size, JSON header padded to 8 bytes, then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, shape, dtype), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise CheckpointError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}")
            if tensor.numel():
                # The bytes as they are in memory (no copy): safetensors is little-endian too.
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def export_hf(
    src: Path,
    output: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Our checkpoint (a step directory, or a checkpoint.dir with ``latest``) -> HF safetensors
    shards + index + config.json in ``output``. Shards are planned from the checkpoint's
    metadata and written as streams: one parameter is in memory at a time."""
    from tqdm import tqdm

    src, _, cfg = read_source(src)
    require_release_architecture(cfg, "Hugging Face")
    stored = stored_tensors(src)
    params = list(weight_keys(src, cfg))
    out_dtype = dtype or stored[params[0][1]].properties.dtype
    if out_dtype not in ST_NAMES:
        raise CheckpointError(f"--dtype: {out_dtype} cannot be written as safetensors")
    # (param index, hf name, row start, rows): every HF tensor is a row range of one parameter.
    plan: list[tuple[int, str, int, int]] = []
    for i, (name, key) in enumerate(params):
        rows_total = stored[key].size[0]
        start = 0
        for hf, rows in hf_parts(name, cfg):
            rows = rows_total if rows < 0 else rows
            plan.append((i, hf, start, rows))
            start += rows
        if name == "embed.weight":
            plan.append((i, "lm_head.weight", 0, rows_total))  # a copy, stored on its own
    shards: list[list[tuple[int, str, int, int]]] = [[]]
    size = 0
    for item in plan:
        i, _, _, rows = item
        shape = tuple(stored[params[i][1]].size)
        nbytes = rows * math.prod(shape[1:]) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    tmp = prepare_output(Path(output), force)
    bar = tqdm(total=len(plan), desc="export", disable=not progress, unit="tensor")
    current: dict[int, torch.Tensor] = {}  # the one parameter being written

    def pieces(shard):
        for i, _, start, rows in shard:
            if i not in current:
                current.clear()
                current[i] = read_tensor(src, params[i][1])
            yield current[i][start : start + rows].to(out_dtype)
            bar.update(1)

    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = []
        for i, hf, _, rows in shard:
            shape = (rows, *tuple(stored[params[i][1]].size)[1:])
            entries.append((hf, shape, out_dtype))
            weight_map[hf] = file
            total += math.prod(shape) * out_dtype.itemsize
        write_safetensors(tmp / file, entries, pieces(shard))
    current.clear()
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, out_dtype), indent=2))
    replace_output(tmp, Path(output))
    return Path(output)


class _HFReader:
    """Tensors of an HF checkpoint directory by name, opening shard files lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / INDEX).is_file():
            self.where = json.loads((path / INDEX).read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            self.where = None
        else:
            raise CheckpointError(f"{path}: neither {INDEX} nor model.safetensors")
        _safetensors()  # a clear error now if the package is missing, not at the first read

    def _file(self, name: str) -> Path:
        return self.path / (self.where[name] if self.where is not None else "model.safetensors")

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self._file(name)), framework="pt") as f:
                return f.get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing") from None

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        from safetensors import safe_open

        with safe_open(str(self._file(name)), framework="pt") as f:
            sl = f.get_slice(name)
            dtype = HF_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(
                    f"{self.path}: {name} is {sl.get_dtype()}; expected one of "
                    f"{', '.join(HF_DTYPES)} weights"
                )
            return tuple(sl.get_shape()), dtype


def import_hf(src: Path, output: Path, *, force: bool = False, progress: bool = True) -> Path:
    """HF Yuan 2.0 directory -> our checkpoint directory (``output/step_0000000`` + latest),
    weights only: start training from it with ``checkpoint.init_from``."""
    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src}: no config.json; not a Hugging Face model directory")
    cfg = model_config_from_hf(json.loads(config_file.read_text()))
    reader = _HFReader(src)
    tensors = []
    for name, param in build_model(cfg).named_parameters():
        parts = hf_parts(name, cfg)
        _, dtype = reader.meta(parts[0][0])

        def load(parts=parts) -> torch.Tensor:
            return torch.cat([reader.get(hf) for hf, _ in parts])

        tensors.append(LazyTensor(manifest.model_key(name), tuple(param.shape), dtype, load))
    for hf in ("lm_head.weight",):
        try:
            head = reader.get(hf)
        except CheckpointError:
            continue
        if not torch.equal(head, reader.get("model.embed_tokens.weight")):
            raise CheckpointError(
                f"{src}: lm_head.weight differs from model.embed_tokens.weight; this model "
                "ties them, so an untied checkpoint cannot be imported"
            )
    state = manifest.TrainingState(0, 0, model_config_dict(cfg), {})
    layout = {"source": "huggingface", "path": str(src.resolve())}
    return write_ours(output, tensors, state, layout, None, force=force, progress=progress)


def verify_hf(ours: Path, hf: Path, progress: bool = True) -> int:
    """Compare every parameter of our checkpoint with the HF directory, tensor by tensor
    (exactly, after casting ours to the HF dtype); raise on the first difference. Returns the
    number of tensors compared."""

    def open_hf(cfg: ModelConfig):
        reader = _HFReader(Path(hf))
        return lambda name: torch.cat([reader.get(n) for n, _ in hf_parts(name, cfg)])

    return verify_weights(ours, hf, open_hf, progress)
