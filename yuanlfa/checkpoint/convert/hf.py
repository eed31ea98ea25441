"""Conversion between our checkpoints and the Hugging Face Yuan 2.0 layout (weights only).

Names and splits are the public format's (docs/yuan2_facts.md): q_proj / k_proj are the first and
second halves (rows) of our fused per-head [q; k] projection, up_proj (the SiLU branch) and
gate_proj the two halves of fc1, ``lm_head.weight`` a copy of the tied embedding (or the
untied head). Tensors are streamed one at a time: the export holds at most one parameter (none
where each HF tensor, a row range of a stored parameter in the output's dtype, is copied file to
file: :mod:`~yuanlfa.checkpoint.file_copy`), the import one tensor (none where its parts lie back
to back in one file: a view over the file's pages).

``config.json`` carries every attribute Yuan 2.0's ``YuanForCausalLM`` (its
``megatron/model/yuan_hf_model.py``) reads, with values that describe the run; settings its code
would not reproduce are refused before anything is written (:mod:`.common`). The run's
SentencePiece tokenizer goes beside the weights (:mod:`.hf_tokenizer`). The import reads the
released models' own directories: their ``config.json`` (tied embeddings, fields this library
never writes), safetensors or ``pytorch_model*.bin`` weights, with or without ``lm_head.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from yuanlfa.checkpoint import dcp_direct, manifest
from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.convert.common import (
    HF,
    YUAN_NORM_EPS,
    YUAN_ROPE_BASE,
    prepare_output,
    read_source,
    replace_output,
    require_release_architecture,
    verify_weights,
    weight_keys,
    write_ours,
)
from yuanlfa.checkpoint.convert.hf_tokenizer import (
    RunTokenizer,
    run_tokenizer,
    write_tokenizer_files,
)
from yuanlfa.checkpoint.dcp_direct import read_tensor
from yuanlfa.checkpoint.dcp_records import stored_tensors
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.file_copy import FileRange, OutputFile, fsync_files
from yuanlfa.checkpoint.stored import Stored, nbytes_of
from yuanlfa.checkpoint.torch_files import load_untrusted
from yuanlfa.config import ModelConfig, config_to_dict
from yuanlfa.model import build_model

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
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
    if name == "output.weight":  # an untied head
        return [("lm_head.weight", cfg.vocab_size)]
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


@dataclass(frozen=True)
class RunFacts:
    """What ``config.json`` says about the run besides the architecture."""

    tokenizer: RunTokenizer
    seq_length: int
    sft: bool
    reset_position_ids: bool


def run_facts(meta: dict, tokenizer: str | None) -> RunFacts:
    """From the run config saved with the checkpoint; an imported checkpoint (no run config)
    keeps what its Hugging Face config said. ``tokenizer`` overrides the run's spec."""
    data = manifest.run_settings(meta, "data")
    train = manifest.run_settings(meta, "train")
    source = meta.get("huggingface_config") or {}
    spec = tokenizer or data.get("tokenizer")
    tok = run_tokenizer(spec)
    if spec is None and "eod_token" in source:
        sep, pad = source.get("sep_token", tok.sep), source.get("pad_token_id", tok.pad)
        tok = RunTokenizer(None, source["eod_token"], sep, pad, None, None, ())
    seq = train.get("seq_length") or source.get("max_position_embeddings") or 4096
    return RunFacts(
        tok,
        int(seq),
        bool(data.get("sft", source.get("use_loss_mask", False))),
        bool(data.get("reset_position_ids", source.get("reset_position_ids", False))),
    )


def hf_config(cfg: ModelConfig, dtype: torch.dtype, run: RunFacts) -> dict:
    """Everything Yuan 2.0's YuanForCausalLM reads from its config (LlamaConfig's fields plus
    eod_token, sep_token, use_loss_mask, reset_attention_mask, reset_position_ids, causal_mask,
    use_flash_attention, use_shareqk), in its released files' spelling."""
    tok = run.tokenizer
    return {
        "architectures": ["YuanForCausalLM"],
        "model_type": "yuan",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu",
        # Yuan's code reads it for the layer and final norms; the LFA norm's is fixed at 1e-6,
        # which the export requires of model.norm_eps anyway.
        "rms_norm_eps": cfg.norm_eps,
        # Not read by Yuan's code (it hard-codes 10000, which the export requires); for readers
        # that do read it.
        "rope_theta": cfg.rope_base,
        "max_position_embeddings": run.seq_length,
        "initializer_range": cfg.init_std,
        # With true, transformers ties lm_head to the embedding on load (the released files'
        # setting); lm_head.weight is stored either way.
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Attention as trained: causal over the whole sample (document attention is refused),
        # in the eager path, which honours masks and runs on any device (true: flash-attn).
        "causal_mask": True,
        "use_flash_attention": False,
        "use_shareqk": False,
        "reset_attention_mask": cfg.document_attention,
        "reset_position_ids": run.reset_position_ids,
        "use_loss_mask": run.sft,
        "eod_token": tok.eod,
        "sep_token": tok.sep,
        "eod_token_id": tok.eod,
        "sep_token_id": tok.sep,
        "eos_token_id": tok.eod,
        "bos_token_id": tok.bos if tok.bos is not None else tok.eod,
        "pad_token_id": tok.pad,
        # Our full model config, so that a round trip restores it exactly.
        "yuanlfa_model_config": config_to_dict(cfg),
    }


def model_config_from_hf(config: dict, where: Path) -> ModelConfig:
    """Our model from a config.json: ours (exact), or a released Yuan 2.0 one, whose code fixes
    what the file does not say (RoPE base 10000, LFA in every layer, LFA norm eps 1e-6)."""
    if "yuanlfa_model_config" in config:
        return manifest.model_config_from_fields(config["yuanlfa_model_config"])
    need = [
        "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
        "vocab_size",
    ]  # fmt: skip
    missing = [k for k in need if k not in config]
    if missing:
        raise CheckpointError(f"{where}: config.json lacks {missing}; not a Yuan 2.0 model")
    if config.get("use_shareqk"):
        raise CheckpointError(
            f"{where}: use_shareqk is true (Yuan's shared-QK variant, no LFA); this library "
            "imports the released LFA architecture only"
        )
    eps = float(config.get("rms_norm_eps", YUAN_NORM_EPS))
    if eps != YUAN_NORM_EPS:
        raise CheckpointError(
            f"{where}: rms_norm_eps is {eps:g}, but Yuan's LFA norm uses 1e-06 and this "
            "library's model has one model.norm_eps for all norms; only 1e-06 imports exactly"
        )
    ffn = config["intermediate_size"]
    return ModelConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        # None when it is Yuan's 4 * hidden, as a run config gives it (init_from compares).
        ffn_hidden_size=None if ffn == 4 * config["hidden_size"] else ffn,
        vocab_size=config["vocab_size"],
        rope_base=YUAN_ROPE_BASE,  # Yuan's code ignores rope_theta
        norm_eps=YUAN_NORM_EPS,
        init_std=float(config.get("initializer_range", 0.02)),
    )


ST_NAMES = {v: k for k, v in HF_DTYPES.items()}


def write_safetensors(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator,
    sync: bool = True,
) -> None:
    """A safetensors file written as a stream: the header (names, dtypes, shapes, offsets) is
    known from ``entries`` up front, then each item of ``tensors`` (in ``entries`` order) is
    appended as it comes, so only one is in memory: a tensor, or a sequence of
    :class:`~yuanlfa.checkpoint.file_copy.FileRange` holding its exact bytes, copied file to
    file. Same bytes as ``safetensors.save_file``'s layout: u64 header size, JSON header padded
    to 8 bytes, then the data. ``sync`` false: the caller fsyncs the file
    (:func:`~yuanlfa.checkpoint.file_copy.fsync_files`)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = []
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
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with OutputFile(path) as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (name, shape, dtype), size, item in zip(entries, sizes, tensors, strict=True):
            if not isinstance(item, torch.Tensor):  # byte ranges of the source: a kernel copy
                if nbytes_of(item) != size:
                    raise CheckpointError(f"internal: {name}'s source ranges are not {size} bytes")
                f.copy_all(item)
                continue
            if tuple(item.shape) != shape or item.dtype != dtype:
                raise CheckpointError(f"internal: {name} is {tuple(item.shape)} {item.dtype}")
            # The bytes as they are in memory (no copy): safetensors is little-endian too.
            f.write(item)
        f.close(sync)


def export_hf(
    src: Path,
    output: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
    force: bool = False,
    progress: bool = True,
    tokenizer: str | None = None,
) -> Path:
    """Our checkpoint (a step directory, or a checkpoint.dir with ``latest``) -> HF safetensors
    shards + index + config.json (+ the tokenizer files of a SentencePiece run) in ``output``.
    Shards are planned from the checkpoint's metadata and written as streams: one parameter is
    in memory at a time. ``tokenizer``: a ``data.tokenizer`` spec replacing the run's (e.g.
    when its model file has moved). Refused before anything is written when Yuan 2.0's code
    would compute another model (:func:`~.common.release_problems`)."""
    from tqdm import tqdm

    src, meta, cfg = read_source(src)
    require_release_architecture(cfg, HF)
    run = run_facts(meta, tokenizer)
    stored = stored_tensors(src)
    params = list(weight_keys(src, cfg))
    # "keep": the dtype the run trained in (its parameters), not that of its fp32 masters.
    out_dtype = dtype or stored[manifest.model_key(params[0][0])].properties.dtype
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
        if name == "embed.weight" and cfg.tie_embeddings:
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
    # Where a parameter is stored in the output's dtype as blocks of whole rows, each HF tensor
    # (a row range) is a byte range of the source files: copied file to file, never read.
    located: dict[int, Stored | None] = {}

    def pieces(shard):
        for i, _, start, rows in shard:
            key = params[i][1]
            if i not in located:
                same = stored[key].properties.dtype == out_dtype
                located[i] = dcp_direct.stored(src, key) if same else None
            if located[i] is not None:
                row = math.prod(stored[key].size[1:]) * out_dtype.itemsize
                yield located[i].slice(start * row, rows * row)
            else:
                if i not in current:
                    current.clear()
                    current[i] = read_tensor(src, key)
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
        # Synced all at once below: each shard goes to disk while the next one is written.
        write_safetensors(tmp / file, entries, pieces(shard), sync=False)
    current.clear()
    fsync_files(sorted(tmp.glob("*.safetensors")))
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, out_dtype, run), indent=2))
    write_tokenizer_files(run.tokenizer, tmp, run.seq_length)
    replace_output(tmp, Path(output))
    return Path(output)


def _read_json(path: Path, what: str) -> dict:
    """A JSON object file of the checkpoint; a damaged one is named."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable {what} ({exc}); the file is truncated or corrupt"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a {what} object")
    return data


class _HFReader:
    """Tensors of an HF checkpoint directory by name: safetensors shards (opened lazily), or the
    ``pytorch_model*.bin`` files some released models ship (through the allow-list unpickler,
    memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = False
        self._bins: dict[str, dict] = {}
        self._headers: dict[Path, dict] = {}
        if (path / INDEX).is_file() or (path / "model.safetensors").is_file():
            _safetensors()  # a clear error now if the package is missing, not at the first read
        if (path / INDEX).is_file():
            self.where = _read_json(path / INDEX, "shard index").get("weight_map")
            if not isinstance(self.where, dict):
                raise CheckpointError(f"{path / INDEX}: no 'weight_map'; not a shard index")
        elif (path / "model.safetensors").is_file():
            self.where = {n: "model.safetensors" for n in self._keys(path / "model.safetensors")}
        elif (path / BIN_INDEX).is_file():
            self.where = _read_json(path / BIN_INDEX, "shard index").get("weight_map")
            if not isinstance(self.where, dict):
                raise CheckpointError(f"{path / BIN_INDEX}: no 'weight_map'; not a shard index")
            self.bin = True
        elif (path / "pytorch_model.bin").is_file():
            self.bin = True
            self.where = {n: "pytorch_model.bin" for n in self._bin(path / "pytorch_model.bin")}
        else:
            raise CheckpointError(
                f"{path}: none of {INDEX}, model.safetensors, {BIN_INDEX}, pytorch_model.bin"
            )

    def _keys(self, file: Path) -> list[str]:
        with self._open_file(file) as f:
            return list(f.keys())

    def _bin(self, file: Path) -> dict:
        if file.name not in self._bins:
            state = load_untrusted(file)  # memory-mapped: tensors are read when used
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: not a state dict")
            self._bins[file.name] = state
        return self._bins[file.name]

    def names(self) -> list[str]:
        return list(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def _file(self, name: str) -> Path:
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing")
        return self.path / self.where[name]

    def _open(self, name: str):
        """The safetensors shard holding ``name``, opened; a missing or damaged one is named."""
        return self._open_file(self._file(name))

    @staticmethod
    def _open_file(file: Path):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(file), framework="pt")
        except OSError as exc:
            problem = exc.strerror or str(exc)
            raise CheckpointError(f"{file}: cannot read the shard ({problem})") from None
        except SafetensorError as exc:
            problem = " ".join(str(exc).split())
            raise CheckpointError(
                f"{file}: not a readable safetensors shard ({problem}); the file is truncated "
                "or corrupt, download it again"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        if self.bin:
            return self._bin(self._file(name))[name]
        with self._open(name) as f:
            return f.get_tensor(name)

    def _spans(self, file: Path) -> dict[str, tuple[str, list[int], int, int]]:
        """name -> (dtype label, shape, file offset, bytes) from a safetensors header (a u64
        length, then JSON); an empty dict where it is not plainly readable."""
        if file not in self._headers:
            spans = {}
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    size = os.fstat(f.fileno()).st_size
                    header = json.loads(f.read(n)) if 8 + n <= size else {}
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = entry["data_offsets"]
                    if not 0 <= begin <= end <= size - 8 - n:
                        spans = {}
                        break
                    spans[name] = (entry["dtype"], list(entry["shape"]), 8 + n + begin, end - begin)
            except (OSError, ValueError, KeyError, TypeError):
                spans = {}  # safe_open names the damage when the tensor is read
            self._headers[file] = spans
        return self._headers[file]

    def _part_spans(self, names: list[str]):
        """``(dtype, [(file, offset, bytes, rows)])`` of the tensors ``names`` stacked along
        rows, when each is plainly stored in a safetensors file with one dtype and the same
        trailing shape; None otherwise."""
        if self.bin or sys.byteorder != "little" or not names:
            return None
        parts, dtype, trailing = [], None, None
        for n in names:
            file = self._file(n)
            spans = self._spans(file)
            if n not in spans:
                return None
            label, shape, start, nbytes = spans[n]
            if not shape or HF_DTYPES.get(label) is None:
                return None
            if dtype is None:
                dtype, trailing = HF_DTYPES[label], shape[1:]
            if HF_DTYPES[label] != dtype or shape[1:] != trailing:
                return None
            if nbytes != math.prod(shape) * dtype.itemsize:
                return None
            parts.append((file, start, nbytes, shape[0]))
        return dtype, parts

    def located(self, names: list[str], shape: tuple[int, ...]) -> Stored | None:
        """Where the bytes of ``names`` stacked along rows lie in the shards, when that stack
        is plainly stored with the shape ``shape``: the writer of our format copies them file
        to file. None otherwise."""
        found = self._part_spans(names)
        if found is None:
            return None
        dtype, parts = found
        trailing = self._spans(parts[0][0])[names[0]][1][1:]
        if [sum(rows for *_, rows in parts), *trailing] != list(shape):
            return None
        return Stored([FileRange(file, start, nbytes) for file, start, nbytes, _ in parts])

    def rows(self, names: list[str]) -> torch.Tensor | None:
        """The tensors ``names`` concatenated along rows without a copy, when they lie back to
        back in one safetensors file with one dtype (our exports write q / k and up / gate
        so): a tensor over the file's pages (memory-mapped, read-only), which the writer of
        our format writes straight from the page cache. None otherwise (then torch.cat)."""
        found = self._part_spans(names)
        if found is None:
            return None
        dtype, parts = found
        file, offset = parts[0][0], parts[0][1]
        shape = [0, *self._spans(file)[names[0]][1][1:]]
        end, rows = offset, 0
        for f, start, nbytes, count in parts:
            if f != file or start != end:
                return None
            end, rows = start + nbytes, rows + count
        if end == offset:
            return None
        # A mapping of this range only, unmapped when the tensor is freed: the process maps at
        # most the tensors in flight, not the whole file.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(file, "rb") as f:
            region = mmap.mmap(f.fileno(), end - start, access=mmap.ACCESS_READ, offset=start)
        if hasattr(mmap, "MADV_WILLNEED"):  # read ahead in large requests, not page by page
            with contextlib.suppress(OSError):
                region.madvise(mmap.MADV_WILLNEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: nothing writes into it
            flat = torch.frombuffer(
                region, dtype=dtype, count=(end - offset) // dtype.itemsize, offset=offset - start
            )
        return flat.view(rows, *shape[1:])

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.bin:
            t = self.get(name)
            shape, dtype, label = tuple(t.shape), t.dtype, str(t.dtype)
        else:
            with self._open(name) as f:
                sl = f.get_slice(name)
                shape, label = tuple(sl.get_shape()), sl.get_dtype()
                dtype = HF_DTYPES.get(label)
        if dtype not in HF_DTYPES.values():
            raise CheckpointError(
                f"{self.path}: {name} is {label}; expected one of {', '.join(HF_DTYPES)} weights"
            )
        return shape, dtype


def _check_extra(reader: _HFReader, used: set[str], cfg: ModelConfig, src: Path) -> None:
    """Every tensor of the source is accounted for. Yuan's HF model also saves each layer's
    RoPE frequencies (a persistent buffer): they must be base 10000's, the only base it has."""
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (YUAN_ROPE_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))
    unmapped = []
    for name in reader.names():
        if name in used:
            continue
        if name.endswith("self_attn.rotary_emb.inv_freq"):
            if not torch.allclose(reader.get(name).float(), inv_freq, rtol=1e-6, atol=0):
                raise CheckpointError(
                    f"{src}: {name} is not RoPE base 10000's; Yuan 2.0's code has no other base"
                )
            continue
        unmapped.append(name)
    if unmapped:
        raise CheckpointError(
            f"{src}: {len(unmapped)} tensors have no place in this model: "
            f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}; not a Yuan 2.0 "
            "model of this shape"
        )


def import_hf(src: Path, output: Path, *, force: bool = False, progress: bool = True) -> Path:
    """HF Yuan 2.0 directory -> our checkpoint directory (``output/step_0000000`` + latest),
    weights only: start training from it with ``checkpoint.init_from``. Reads our exports and
    the released models' directories (their config.json, tied or not, with or without
    ``lm_head.weight``); every source tensor must find its place, checked before writing."""
    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src}: no config.json; not a Hugging Face model directory")
    config = _read_json(config_file, "model config")
    cfg = model_config_from_hf(config, config_file)
    reader = _HFReader(src)
    embed = "model.embed_tokens.weight"
    # transformers ties lm_head to the embedding when tie_word_embeddings is true (the released
    # files' setting, and its default); otherwise the stored head is the head.
    untie = config.get("tie_word_embeddings", True) is False
    if "yuanlfa_model_config" not in config and reader.has("lm_head.weight") and untie:
        tied = torch.equal(reader.get("lm_head.weight"), reader.get(embed))
        cfg = dataclasses.replace(cfg, tie_embeddings=tied)
    if not cfg.tie_embeddings and not reader.has("lm_head.weight"):
        raise CheckpointError(f"{src}: the head is untied but lm_head.weight is missing")
    head_differs = cfg.tie_embeddings and reader.has("lm_head.weight")
    if head_differs and not torch.equal(reader.get("lm_head.weight"), reader.get(embed)):
        raise CheckpointError(
            f"{src}: lm_head.weight differs from {embed}, but the config ties them "
            "(tie_word_embeddings true); set it false in config.json to import the head as an "
            "untied one"
        )
    tensors = []
    used = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name, param in build_model(cfg).named_parameters():
        parts = hf_parts(name, cfg)
        _, dtype = reader.meta(parts[0][0])
        used.update(hf for hf, _ in parts)

        def load(parts=parts) -> torch.Tensor:
            names = [hf for hf, _ in parts]
            whole = reader.rows(names)  # no copy where the parts lie back to back
            return whole if whole is not None else torch.cat([reader.get(n) for n in names])

        where = reader.located([hf for hf, _ in parts], tuple(param.shape))
        key = manifest.model_key(name)
        tensors.append(LazyTensor(key, tuple(param.shape), dtype, load, where))
    _check_extra(reader, used, cfg, src)
    # Kept so that an export of this checkpoint (never trained here) describes it as the
    # source did: special ids, position limit, data settings.
    keep = ("eod_token", "sep_token", "pad_token_id", "max_position_embeddings",
            "use_loss_mask", "reset_position_ids")  # fmt: skip
    extra = {"huggingface_config": {k: config[k] for k in keep if k in config}}
    state = manifest.TrainingState(0, 0, config_to_dict(cfg), extra)
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
