"""Conversion between our checkpoints and the Megatron / Yuan 2.0 format, both ways.

The Megatron layout (docs/yuan2_facts.md 4):
``iter_XXXXXXX/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt``
plus ``latest_checkpointed_iteration.txt``; each file a pickled dict with ``args`` (an
argparse.Namespace), ``checkpoint_version``, ``iteration``, ``model`` (nested dicts, layer indices
local to the stage), optionally ``optimizer`` and ``rng_state``. Tensor-parallel slicing is
:func:`~yuanlfa.parallel.tp.plan.shard_pieces`, the same as in training, which is the
release's (vocab rows; QK and V rows by whole heads; fc1 as [SiLU slice; linear slice]).

Optimizer state is written as Megatron's non-distributed mixed-precision optimizer lays it out:
``optimizer["optimizer"]`` is a torch Adam state dict (per-parameter ``exp_avg``, ``exp_avg_sq``,
``step``; two param groups, weight decay then none) and ``optimizer["fp32_from_fp16_params"]``
the fp32 master weights per group. Parameters are numbered in the order of the file's model dict.
Files whose optimizer state has another layout (e.g. Megatron's distributed optimizer, which keeps
it in separate files) convert with ``weights_only``.

Both directions stream: reading unpickles the source files with data-less tensors and reads each
shard straight into its place in the whole tensor (:class:`~yuanlfa.checkpoint.torch_direct.
TorchFile`); writing (:func:`~yuanlfa.checkpoint.torch_files.save_streaming` for Megatron files,
:func:`~yuanlfa.checkpoint.dcp_write.write_dcp` for ours) copies each tensor whose bytes lie in
the source file to file (:mod:`~yuanlfa.checkpoint.stored` says where) and produces the others
one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from yuanlfa.checkpoint import manifest
from yuanlfa.checkpoint.blocks import LazyTensor
from yuanlfa.checkpoint.convert.common import (
    prepare_output,
    read_source,
    replace_output,
    require_release_architecture,
    verify_weights,
    write_ours,
)
from yuanlfa.checkpoint.dcp_direct import read_tensor, stored
from yuanlfa.checkpoint.dcp_records import stored_tensors
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.stored import Block, Part, Ranges, Stored
from yuanlfa.checkpoint.torch_direct import TorchFile
from yuanlfa.checkpoint.torch_files import Pending, save_streaming
from yuanlfa.config import (
    ModelConfig,
    blocks_problem,
    config_to_dict,
    tp_indivisible,
    uneven_problem,
)
from yuanlfa.layout import PipelineLayout, uniform_blocks
from yuanlfa.model import build_model
from yuanlfa.parallel.dp.zero import no_weight_decay
from yuanlfa.parallel.tp.plan import shard_pieces

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_COMPARE_BYTES = 64 * 2**20  # row blocks of the tied-head check

# Our per-layer parameter names -> the release's, in the release's module order.
LAYER_NAMES = {
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
EMBEDDING = ("language_model", "embedding", "word_embeddings", "weight")
HEAD_COPY = ("word_embeddings_for_head", "weight")
OUTPUT_LAYER = ("language_model", "output_layer", "weight")
ENCODER = ("language_model", "encoder")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def check_blocks(blocks: list[int], pp: int, num_layers: int, flag: str) -> list[int]:
    problem = blocks_problem(tuple(blocks), pp, num_layers, "the pipeline stages", "num_layers")
    if problem is not None:
        raise CheckpointError(f"{flag}: {problem}")
    return list(blocks)


def default_blocks(pp: int, num_layers: int, flag: str) -> list[int]:
    problem = uneven_problem(num_layers, pp, "the model's num_layers")
    if problem is not None:
        raise CheckpointError(f"{problem}; give the split with {flag} (e.g. {flag} 2,3,...)")
    return list(uniform_blocks(num_layers, pp))


def places(name: str, blocks: list[int], tied: bool = True) -> list[tuple[int, tuple[str, ...]]]:
    """Where our parameter ``name`` lives: ``(stage, path in the file's model dict)``; the tied
    embedding is on the first stage and, with pp > 1, copied on the last for the head; an
    untied head is the last stage's ``language_model.output_layer``."""
    pp = len(blocks)
    if name == "embed.weight":
        return [(0, EMBEDDING)] + ([(pp - 1, HEAD_COPY)] if pp > 1 and tied else [])
    if name == "output.weight":  # --untie-embeddings-and-output-weights
        return [(pp - 1, OUTPUT_LAYER)]
    if name == "final_norm.weight":
        return [(pp - 1, (*ENCODER, "final_layernorm.weight"))]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise CheckpointError(
            f"parameter {name!r} has no Megatron name (a plug-in module); this converter "
            "handles the Yuan 2.0 architecture"
        )
    layer, rest = int(match.group(1)), match.group(2)
    layout = PipelineLayout(tuple(blocks), pp)
    try:
        stage = layout.stage_of_layer(layer)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    local = layer - layout.layer_ids(stage)[0]
    return [(stage, (*ENCODER, f"layers.{local}.{LAYER_NAMES[rest]}"))]


def _shard_shape(name: str, shape: tuple[int, ...], tp_rank: int, tp: int) -> tuple[int, ...]:
    dim, pieces = shard_pieces(name, shape, tp_rank, tp)
    out = list(shape)
    out[dim] = sum(length for _, _, length in pieces)
    return tuple(out)


def _check_tp(cfg: ModelConfig, tp: int) -> None:
    problem = tp_indivisible(tp, cfg)
    if problem is not None:
        raise CheckpointError(f"tensor parallelism {problem}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...], where: Path) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{where}: model[{']['.join(path)}] is missing")
        node = node[key]
    return node


def megatron_args(cfg: ModelConfig, tp: int, blocks: list[int], meta: dict, dtype) -> dict:
    """The ``args`` fields a Megatron / Yuan 2.0 run of this model would carry."""
    state = manifest.training_state(meta)
    seq = manifest.run_settings(meta, "train").get("seq_length")
    seed = run_seed(meta)
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_size,
        "num_attention_heads": cfg.num_heads,
        "kv_channels": cfg.head_dim,
        "padded_vocab_size": cfg.vocab_size,
        "seq_length": seq,
        "max_position_embeddings": seq,
        # What Yuan's check_checkpoint_args compares (its scripts use RoPE, no learned
        # positions; the default when missing would be true and fail the comparison).
        "add_position_embedding": False,
        "use_rotary_position_embeddings": True,
        "make_vocab_size_divisible_by": 128,
        "tokenizer_type": "YuanTokenizer",
        "data_parallel_random_init": False,
        "seed": seed,
        "reset_attention_mask": cfg.document_attention,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": len(blocks),
        "pipeline_model_parallel_blocks": list(blocks),
        "use_lf_gate": cfg.lfa,
        "lf_conv2d_group": 1,
        "lf_conv2d_num_pad": 1,
        "swiglu": True,
        "add_bias_linear": False,
        "untie_embeddings_and_output_weights": not cfg.tie_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": cfg.rope_base,
        "norm_epsilon": cfg.norm_eps,
        "layernorm_epsilon": cfg.norm_eps,
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "iteration": state.step,
        "consumed_train_samples": state.consumed_samples,
        # Our full model config, so that a round trip restores it exactly.
        "yuanlfa_model_config": config_to_dict(cfg),
    }


def model_config_from_args(args: Any, where: Path) -> ModelConfig:
    fields = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if "yuanlfa_model_config" in fields:
        return manifest.model_config_from_fields(fields["yuanlfa_model_config"])
    need = ["num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"]
    missing = [k for k in need if fields.get(k) is None]
    if missing:
        raise CheckpointError(
            f"{where}: args lacks {missing}; give the model with --config PATH (a yuanlfa YAML "
            "whose model section describes this checkpoint)"
        )
    eps = fields.get("norm_epsilon", fields.get("layernorm_epsilon", 1e-6))
    return ModelConfig(
        num_layers=fields["num_layers"],
        hidden_size=fields["hidden_size"],
        num_heads=fields["num_attention_heads"],
        ffn_hidden_size=fields.get("ffn_hidden_size"),
        vocab_size=fields["padded_vocab_size"],
        rope_base=float(fields.get("rotary_base") or 10000.0),
        norm_eps=float(eps),
        lfa=bool(fields.get("use_lf_gate", True)),
        tie_embeddings=not fields.get("untie_embeddings_and_output_weights", False),
    )


def blocks_from_args(args: Any) -> list[int] | None:
    fields = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    blocks = fields.get("pipeline_model_parallel_blocks")
    if blocks is None:
        return None
    if isinstance(blocks, str):
        return [int(b) for b in blocks.replace(" ", "").split(",") if b]
    return [int(b) for b in blocks]


def run_seed(meta: dict) -> int:
    return int(manifest.run_settings(meta, "train").get("seed") or 1234)


def _philox_state(seed: int) -> Pending:
    """A CUDA generator's state after ``manual_seed(seed)`` (torch.cuda.get_rng_state): the
    seed and the offset 0, two little-endian 64-bit integers. Built without a GPU."""
    raw = (seed % 2**64).to_bytes(8, "little") + bytes(8)
    return Pending((16,), torch.uint8, lambda: torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def rng_state(seed: int, tp_rank: int, pp_rank: int) -> list[dict[str, Any]]:
    """``rng_state`` as Yuan 2.0's ``get_rng_state`` saves it (a list over data-parallel ranks,
    one entry without --data-parallel-random-init), so its ``load_checkpoint`` takes the file
    without --no-load-rng. The states are those its ``_set_random_seed`` gives this rank for
    the run's seed (seed + 100 * pp_rank; the model-parallel CUDA tracker at + 2718 + tp_rank):
    our RNG streams are not Megatron's, so a continuation starts from seeded generators."""
    import random

    import numpy as np

    stage_seed = seed + 100 * pp_rank
    cpu = torch.Generator().manual_seed(stage_seed).get_state()
    return [
        {
            "random_rng_state": random.Random(stage_seed).getstate(),
            "np_rng_state": np.random.RandomState(stage_seed).get_state(),
            "torch_rng_state": Pending(tuple(cpu.shape), cpu.dtype, lambda: cpu),
            "cuda_rng_state": _philox_state(stage_seed),
            "rng_tracker_states": {
                "model-parallel-rng": _philox_state(stage_seed + 2718 + tp_rank)
            },
        }
    ]


def scheduler_state(meta: dict) -> dict[str, Any]:
    """``opt_param_scheduler`` as Megatron's OptimizerParamScheduler saves it for an
    iteration-based run (steps counted in samples: iterations x global batch), from the run's
    settings; Yuan's loader needs it next to an optimizer state."""
    optim, train = manifest.run_settings(meta, "optim"), manifest.run_settings(meta, "train")
    gbs = int(train.get("global_batch_size") or 1)
    steps = int(train.get("steps") or 0)
    decay = int(optim.get("decay_steps") or steps)
    wd = float(optim.get("weight_decay", 0.1))
    return {
        "max_lr": float(optim.get("lr", 0.0)),
        "min_lr": float(optim.get("min_lr", 0.0)),
        "lr_warmup_steps": int(optim.get("warmup_steps") or 0) * gbs,
        "lr_decay_steps": decay * gbs,
        "lr_decay_style": optim.get("lr_schedule", "cosine"),
        "num_steps": manifest.training_state(meta).consumed_samples,
        "start_wd": wd,
        "end_wd": wd,
        "wd_incr_style": "constant",
        "wd_incr_steps": steps * gbs,
    }


# --- ours -> Megatron ------------------------------------------------------------------------


class _Source:
    """Tensor-parallel slices of whole tensors under our checkpoint keys (``read(key)`` gives
    one). The last whole tensor read is kept, so the tp files of a stage, written in lockstep,
    read each tensor once."""

    def __init__(
        self,
        dtypes: dict[str, torch.dtype],
        read: Callable[[str], torch.Tensor],
        located: Callable[[str], Stored | None] = lambda key: None,
    ):
        self.dtypes, self.read, self._locate = dtypes, read, located
        self._last: tuple[str, torch.Tensor] | None = None
        self._located: dict[str, Any] = {}

    @classmethod
    def ours(cls, path: Path) -> _Source:
        meta = stored_tensors(path)
        return cls(
            {k: m.properties.dtype for k, m in meta.items()},
            lambda k: read_tensor(path, k),
            lambda k: stored(path, k),
        )

    @classmethod
    def lazy(cls, tensors: list[LazyTensor]) -> _Source:
        by_key = {t.key: t for t in tensors}
        return cls(
            {t.key: t.dtype for t in tensors},
            lambda k: by_key[k].load(),
            lambda k: by_key[k].stored,
        )

    def ranges(
        self, key: str, name: str, shape: tuple[int, ...], tp_rank: int, tp: int, dtype
    ) -> Ranges | None:
        """The byte ranges of existing files that hold this rank's shard exactly, in order,
        when they exist (same dtype; a block of rows, or of columns of every row): the writer
        copies them file to file."""
        if dtype != self.dtypes.get(key):
            return None
        if key not in self._located:
            self._located[key] = self._locate(key)
        where = self._located[key]
        if where is None:
            return None
        dim, pieces = shard_pieces(name, shape, tp_rank, tp)
        return where.block(shape, dtype.itemsize, dim, pieces)

    def has(self, key: str) -> bool:
        return key in self.dtypes

    def dtype(self, key: str) -> torch.dtype:
        return self.dtypes[key]

    def cost(self, key: str, shape: tuple[int, ...]) -> int:
        """Bytes held while a slice of ``key`` is loaded: the whole tensor it is cut from."""
        return math.prod(shape) * self.dtypes.get(key, torch.float32).itemsize

    def whole(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = None  # free the previous one before reading the next
            self._last = (key, self.read(key))
        return self._last[1]

    def shard(self, key: str, name: str, tp_rank: int, tp: int, dtype) -> Callable[[], Any]:
        def load() -> torch.Tensor:
            full = self.whole(key)
            dim, pieces = shard_pieces(name, tuple(full.shape), tp_rank, tp)
            parts = [full.narrow(dim, start, length) for _, start, length in pieces]
            part = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
            return part.to(dtype)

        return load


def export_megatron(
    src: Path,
    output: Path,
    *,
    tp: int,
    pp: int,
    blocks: list[int] | None = None,
    weights_only: bool = False,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Our checkpoint -> the Megatron / Yuan 2.0 layout for ``tp`` x ``pp`` and ``blocks``."""
    src, meta, cfg = read_source(src)
    return _export(
        _Source.ours(src), meta, cfg, Path(output), tp, pp, blocks, weights_only, dtype, force,
        progress,
    )  # fmt: skip


def _export(
    source: _Source,
    meta: dict,
    cfg: ModelConfig,
    output: Path,
    tp: int,
    pp: int,
    blocks: list[int] | None,
    weights_only: bool,
    dtype: torch.dtype | None,
    force: bool,
    progress: bool,
) -> Path:
    from tqdm import tqdm

    require_release_architecture(cfg, "Megatron")
    _check_tp(cfg, tp)
    blocks = (
        check_blocks(blocks, pp, cfg.num_layers, "--target-blocks")
        if blocks is not None
        else default_blocks(pp, cfg.num_layers, "--target-blocks")
    )
    names = [(n, tuple(p.shape)) for n, p in build_model(cfg).named_parameters()]
    has_optim = all(source.has(manifest.optim_key(n, "exp_avg")) for n, _ in names)
    if progress and not has_optim and not weights_only:
        print("export: the source has no optimizer state; converting the weights", flush=True)
    with_optim = has_optim and not weights_only
    out_dtype = dtype or source.dtype(manifest.model_key(names[0][0]))
    hyper = manifest.run_settings(meta, "optim")
    iteration = manifest.training_state(meta).step
    tmp = prepare_output(Path(output), force)
    bar = tqdm(desc="export", unit="B", unit_scale=True, disable=not progress)
    for stage in range(pp):
        # The release's order: the embedding, the layers, the final norm, then the head's copy.
        entries = [
            (path, name, shape)
            for name, shape in names
            for where, path in places(name, blocks, cfg.tie_embeddings)
            if where == stage
        ]
        entries.sort(key=lambda e: e[0] == HEAD_COPY)
        files = []
        for tp_rank in range(tp):
            model: dict = {}
            optim_params: list[tuple[str, tuple[int, ...]]] = []
            for path, name, shape in entries:
                shard = _shard_shape(name, shape, tp_rank, tp)
                key = manifest.model_key(name)
                load = source.shard(key, name, tp_rank, tp, out_dtype)
                ranges = source.ranges(key, name, shape, tp_rank, tp, out_dtype)
                pending = Pending(shard, out_dtype, load, source.cost(key, shape), ranges)
                _set(model, path, pending)
                optim_params.append((name, shard))
            args = megatron_args(cfg, tp, blocks, meta, out_dtype)
            state: dict[str, Any] = {
                "args": argparse.Namespace(**args),
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "model": model,
            }
            if with_optim:
                state["optimizer"] = _optimizer_state(
                    source, names, optim_params, tp_rank, tp, meta, hyper
                )
                state["opt_param_scheduler"] = scheduler_state(meta)
            state["rng_state"] = rng_state(run_seed(meta), tp_rank, stage)
            file = tmp / f"iter_{iteration:07d}" / rank_dir(tp_rank, stage, pp) / FILE
            file.parent.mkdir(parents=True)
            files.append((state, file))
        save_streaming(files, progress=bar.update)
    bar.close()
    (tmp / TRACKER).write_text(f"{iteration}\n")
    replace_output(tmp, Path(output))
    return Path(output)


def _optimizer_state(
    source: _Source,
    names: list[tuple[str, tuple[int, ...]]],
    params: list[tuple[str, tuple[int, ...]]],
    tp_rank: int,
    tp: int,
    meta: dict,
    hyper: dict,
) -> dict:
    steps = float(manifest.adam_steps(meta))
    groups: dict[bool, list[int]] = {True: [], False: []}
    masters: dict[bool, list[Pending]] = {True: [], False: []}
    state = {}
    whole = dict(names)
    for index, (name, shard) in enumerate(params):
        decay = not no_weight_decay(name, torch.empty(shard, device="meta"))
        groups[decay].append(index)

        def pending(key: str, name=name, shard=shard) -> Pending:
            load = source.shard(key, name, tp_rank, tp, torch.float32)
            return Pending(shard, torch.float32, load, source.cost(key, whole[name]))

        state[index] = {
            "step": Pending((), torch.float32, lambda: torch.tensor(steps)),
            "exp_avg": pending(manifest.optim_key(name, "exp_avg")),
            "exp_avg_sq": pending(manifest.optim_key(name, "exp_avg_sq")),
        }
        master = manifest.master_key(name)
        masters[decay].append(pending(master if source.has(master) else manifest.model_key(name)))
    common = {
        "lr": hyper.get("lr", 0.0),
        "betas": (hyper.get("beta1", 0.9), hyper.get("beta2", 0.95)),
        "eps": hyper.get("eps", 1e-8),
        "amsgrad": False,
    }
    param_groups = [
        {**common, "weight_decay": hyper.get("weight_decay", 0.1), "params": groups[True]},
        {**common, "weight_decay": 0.0, "params": groups[False]},
    ]
    return {
        "optimizer": {"state": state, "param_groups": param_groups},
        "fp32_from_fp16_params": [masters[True], masters[False]],
    }


# --- Megatron -> ours ------------------------------------------------------------------------


def find_iteration(src: Path) -> tuple[Path, int]:
    """The iteration directory to read: ``src`` itself, or the one the tracker file names."""
    if src.name.startswith("iter_") or src.name == "release":
        return src, int(src.name.removeprefix("iter_")) if src.name != "release" else 0
    tracker = src / TRACKER
    if not tracker.is_file():
        raise CheckpointError(
            f"{src}: no {TRACKER}; give a Megatron checkpoint directory or one iter_* in it"
        )
    text = tracker.read_text().strip()
    if text == "release":
        return src / "release", 0
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: {text!r} is not an iteration number") from None
    path = src / f"iter_{iteration:07d}"
    if not path.is_dir():
        raise CheckpointError(f"{tracker} names iteration {iteration}, but {path} is missing")
    return path, iteration


def rank_files(iter_dir: Path) -> dict[tuple[int, int], Path]:
    """``(tp_rank, pp_rank) -> file``, checked to form a complete tp x pp grid."""
    found: dict[tuple[int, int], Path] = {}
    for d in iter_dir.iterdir():
        match = re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", d.name)
        if match and (d / FILE).is_file():
            found[(int(match.group(1)), int(match.group(2) or 0))] = d / FILE
    if not found:
        raise CheckpointError(f"{iter_dir}: no mp_rank_*/{FILE} files")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    missing = [rank_dir(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in found]
    if missing:
        raise CheckpointError(f"{iter_dir}: incomplete checkpoint, missing {missing[:4]}")
    return found


def _check_grid(iter_dir: Path, args: Any, files: dict[tuple[int, int], Path]) -> None:
    """The rank directories the checkpoint's own args call for are all there: a missing last
    stage or tp rank would otherwise read as a smaller grid and fail later with a message
    about the split."""
    fields = vars(args) if isinstance(args, argparse.Namespace) else {}
    tp = max(fields.get("tensor_model_parallel_size") or 1, max(t for t, _ in files) + 1)
    pp = max(fields.get("pipeline_model_parallel_size") or 1, max(p for _, p in files) + 1)
    missing = [rank_dir(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        raise CheckpointError(
            f"{iter_dir}: missing {', '.join(d + '/' + FILE for d in missing[:4])} (the "
            f"checkpoint's args say tp {tp} x pp {pp}); copy the whole iteration directory"
        )


def _layer_count(model: dict) -> int:
    encoder = model.get("language_model", {}).get("encoder", {})
    layers = {int(m.group(1)) for k in encoder if (m := re.match(r"layers\.(\d+)\.", k))}
    return len(layers)


class MegatronReader:
    """The tensors of a Megatron / Yuan 2.0 checkpoint as whole (tp-merged) tensors under our
    names. Files are unpickled through the allow-list unpickler with data-less tensors; a
    loader reads the shards' bytes into the whole tensor."""

    def __init__(
        self,
        src: Path,
        *,
        blocks: list[int] | None = None,
        model_cfg: ModelConfig | None = None,
        progress: bool = True,
    ) -> None:
        self.iter_dir, self.iteration = find_iteration(Path(src))
        self.files = rank_files(self.iter_dir)
        self.tp = max(t for t, _ in self.files) + 1
        self.pp = max(p for _, p in self.files) + 1
        if progress:
            print(
                f"reading {self.iter_dir} (tp {self.tp}, pp {self.pp}, {len(self.files)} files)",
                flush=True,
            )
        # Pickles only: tensors carry no data until a loader reads them into place.
        self.sources = {key: TorchFile(path) for key, path in sorted(self.files.items())}
        self.states = {key: f.obj for key, f in self.sources.items()}
        for key, state in self.states.items():
            if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
                raise CheckpointError(f"{self.files[key]}: no 'model' dict; not a Megatron file")
        first = self.states[(0, 0)]
        self.args = first.get("args")
        _check_grid(self.iter_dir, self.args, self.files)
        self.cfg = model_cfg or model_config_from_args(self.args, self.files[(0, 0)])
        _check_tp(self.cfg, self.tp)
        pp, layers = self.pp, self.cfg.num_layers
        if blocks is not None:
            self.blocks = check_blocks(blocks, pp, layers, "--blocks")
        elif (saved := blocks_from_args(self.args)) is not None:
            self.blocks = check_blocks(saved, pp, layers, "args.pipeline_model_parallel_blocks")
        else:
            self.blocks = default_blocks(pp, layers, "--blocks")
        # The reference never checks the split on load; a wrong one would misplace whole layers.
        for stage in range(pp):
            count = _layer_count(self.states[(0, stage)]["model"])
            if count != self.blocks[stage]:
                raise CheckpointError(
                    f"{self.files[(0, stage)]} holds {count} layers but the split "
                    f"{self.blocks} puts {self.blocks[stage]} on stage {stage}; give the right "
                    "split with --blocks"
                )
        self.params = [(n, tuple(p.shape)) for n, p in build_model(self.cfg).named_parameters()]
        self.has_optimizer = all(s.get("optimizer") is not None for s in self.states.values())
        self._pool: ThreadPoolExecutor | None = None
        self._check_accounted()

    def _check_accounted(self) -> None:
        """Every tensor in every file has a place in this model and every place is filled, so
        nothing of the source is silently dropped (an untied head read as tied, say)."""
        tied = self.cfg.tie_embeddings
        expected: dict[tuple[int, int], set[tuple[str, ...]]] = {k: set() for k in self.files}
        for name, _ in self.params:
            for stage, path in places(name, self.blocks, tied):
                for t in range(self.tp):
                    expected[(t, stage)].add(path)
        for key, state in sorted(self.states.items()):
            found = {p for p in _param_order(state) if not p[-1].endswith("_extra_state")}
            extra, missing = sorted(found - expected[key]), sorted(expected[key] - found)
            if extra:
                hint = "not a Yuan 2.0 model of this shape"
                if OUTPUT_LAYER in extra:
                    hint = (
                        "an untied output layer, but args do not say "
                        "untie_embeddings_and_output_weights; give the model with --config "
                        "(model.tie_embeddings: false)"
                    )
                raise CheckpointError(
                    f"{self.files[key]}: {len(extra)} tensors have no place in the model: "
                    f"{', '.join('.'.join(p) for p in extra[:5])} ({hint})"
                )
            if missing:
                raise CheckpointError(
                    f"{self.files[key]}: missing {', '.join('.'.join(p) for p in missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''} (the model's config says they are "
                    "on this stage)"
                )

    def check_head_copy(self) -> None:
        """The last stage's copy of the tied embedding (``word_embeddings_for_head``) equals
        the first stage's embedding, shard by shard, as Megatron keeps them (compared in row
        blocks, so memory stays a fraction of the embedding)."""
        if not self.cfg.tie_embeddings or self.pp == 1:
            return
        last = self.pp - 1
        for t in range(self.tp):
            embedding = _get(self.states[(t, 0)]["model"], EMBEDDING, self.files[(t, 0)])
            copy = _get(self.states[(t, last)]["model"], HEAD_COPY, self.files[(t, last)])
            same = copy.shape == embedding.shape and copy.dtype == embedding.dtype
            rows = max(1, _COMPARE_BYTES // max(1, embedding[0].numel() * embedding.element_size()))
            for start in range(0, embedding.shape[0] if same else 0, rows):
                n = min(rows, embedding.shape[0] - start)
                a = self.sources[(t, 0)].read(embedding.narrow(0, start, n))
                b = self.sources[(t, last)].read(copy.narrow(0, start, n))
                if not torch.equal(a, b):
                    same = False
                    break
            if not same:
                raise CheckpointError(
                    f"{self.files[(t, last)]}: word_embeddings_for_head.weight differs from "
                    f"the embedding in {self.files[(t, 0)]}; a tied checkpoint keeps them "
                    "equal, so this one is inconsistent (or its head is untied: then its "
                    "tensor is output_layer.weight and args say "
                    "untie_embeddings_and_output_weights)"
                )

    def _read_all(self, reads: list[tuple[TorchFile, torch.Tensor, torch.Tensor]]) -> None:
        """Each shard straight into its place in the whole tensor; those that land contiguously
        (row slices) are read concurrently, one per file, the rest (column slices, staged
        through a buffer of their size) one at a time so that staging stays one shard."""
        direct = [r for r in reads if r[2].is_contiguous()]
        if len(direct) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(4, self.tp * 2))
            futures = [self._pool.submit(f.read_into, t, dest) for f, t, dest in direct]
            for future in futures:
                future.result()
        else:
            for f, t, dest in direct:
                f.read_into(t, dest)
        for f, t, dest in reads:
            if not dest.is_contiguous():
                f.read_into(t, dest)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for source in self.sources.values():
            source.close()

    def check_optimizer(self) -> None:
        for key, state in self.states.items():
            _check_optimizer_layout(state, self.files[key])

    @property
    def consumed_samples(self) -> int:
        fields = vars(self.args) if isinstance(self.args, argparse.Namespace) else {}
        return int(fields.get("consumed_train_samples") or 0)

    @property
    def adam_steps(self) -> int:
        step = self.states[(0, 0)]["optimizer"]["optimizer"]["state"].get(0, {}).get("step")
        if isinstance(step, torch.Tensor):
            step = self.sources[(0, 0)].read(step)
        return self.iteration if step is None else int(float(step))

    def stored(self, name: str) -> torch.Tensor:
        stage, path = places(name, self.blocks, self.cfg.tie_embeddings)[0]
        return _get(self.states[(0, stage)]["model"], path, self.files[(0, stage)])

    def loader(self, name: str, what: str = "weight") -> tuple[torch.dtype, Callable]:
        """``what``: weight, exp_avg, exp_avg_sq or master. Returns (dtype, load())."""
        shape = dict(self.params)[name]
        stage, path = places(name, self.blocks, self.cfg.tie_embeddings)[0]
        dtype = self.stored(name).dtype if what == "weight" else torch.float32

        def part(t: int) -> torch.Tensor:
            state = self.states[(t, stage)]
            if what == "weight":
                return _get(state["model"], path, self.files[(t, stage)])
            return _optimizer_tensor(state, path, what, self.files[(t, stage)])

        def load() -> torch.Tensor:
            full = torch.empty(shape, dtype=dtype)
            reads = []
            for t in range(self.tp):
                shard = part(t)
                expect = _shard_shape(name, shape, t, self.tp)
                if tuple(shard.shape) != expect:
                    raise CheckpointError(
                        f"{self.files[(t, stage)]}: {'.'.join(path)} is {tuple(shard.shape)}, "
                        f"expected {expect} for this model at tp {self.tp}"
                    )
                if shard.dtype != dtype:
                    raise CheckpointError(
                        f"{self.files[(t, stage)]}: {'.'.join(path)} is {shard.dtype}, the "
                        f"other shards {dtype}"
                    )
                dim, pieces = shard_pieces(name, shape, t, self.tp)
                for local, start, length in pieces:
                    dest = full.narrow(dim, start, length)
                    reads.append((self.sources[(t, stage)], shard.narrow(dim, local, length), dest))
            self._read_all(reads)
            return full

        return dtype, load

    def located(self, name: str, what: str = "weight") -> Stored | None:
        """Where the bytes of the whole (tp-merged) tensor lie in the shards' files, in order,
        when every shard is stored plainly and split by rows or by columns; None otherwise
        (then ``loader`` reads it)."""
        shape = dict(self.params)[name]
        if not shape:
            return None
        stage, path = places(name, self.blocks, self.cfg.tie_embeddings)[0]
        dtype = self.stored(name).dtype if what == "weight" else torch.float32
        blocks = []  # per rank: (dim, its pieces, its bytes as Stored and as a range)
        for t in range(self.tp):
            state = self.states[(t, stage)]
            try:
                if what == "weight":
                    shard = _get(state["model"], path, self.files[(t, stage)])
                else:
                    shard = _optimizer_tensor(state, path, what, self.files[(t, stage)])
            except (CheckpointError, KeyError, ValueError, IndexError, TypeError):
                return None  # the loader names it
            dim, pieces = shard_pieces(name, shape, t, self.tp)
            expect = _shard_shape(name, shape, t, self.tp)
            if not isinstance(shard, torch.Tensor) or tuple(shard.shape) != expect:
                return None
            if shard.dtype != dtype or dim not in (0, 1) or len(shape) < 1 + dim:
                return None
            where = self.sources[(t, stage)].range_of(shard)
            if where is None:
                return None
            blocks.append((dim, pieces, Stored([where]), where))
            if pieces == [(0, 0, shape[0])] and dim == 0:
                break  # replicated: every rank holds the whole tensor
        dim = blocks[0][0]
        itemsize = dtype.itemsize
        if dim == 0:  # the shards' row blocks, in global row order
            row = math.prod(shape[1:]) * itemsize
            parts = sorted(
                ((start, s.slice(local * row, n * row)) for _, pieces, s, _ in blocks
                 for local, start, n in pieces),
                key=lambda part: part[0],
            )  # fmt: skip
            return Stored(Ranges([b for _, ranges in parts for b in ranges.blocks]))
        # Column blocks: row i of the whole is row i of each shard's pieces, in column order;
        # one block of rows (however many), each shard's piece a part.
        inner = math.prod(shape[2:]) * itemsize
        order = sorted(
            (
                (start, where, local, n, _shard_shape(name, shape, t, self.tp)[1])
                for t, (_, pieces, _, where) in enumerate(blocks)
                for local, start, n in pieces
            ),
            key=lambda part: part[0],
        )
        return Stored(
            Ranges(
                [
                    Block(
                        shape[0],
                        tuple(
                            Part(where.path, where.offset + local * inner, cols * inner, n * inner)
                            for _, where, local, n, cols in order
                        ),
                    )
                ]
            )
        )


def _as_ours(
    reader: MegatronReader, src: Path, weights_only: bool, progress: bool
) -> tuple[list[LazyTensor], manifest.TrainingState, dict, dict | None]:
    """What our checkpoint of ``reader``'s would hold: its tensors (read when loaded), training
    state, layout record and optimizer record."""
    reader.check_head_copy()
    with_optim = reader.has_optimizer and not weights_only
    if with_optim:
        reader.check_optimizer()
    elif progress and not weights_only:
        print("import: the source has no optimizer state; converting the weights", flush=True)
    tensors: list[LazyTensor] = []
    for name, shape in reader.params:
        dtype, load = reader.loader(name)
        where = reader.located(name)
        tensors.append(LazyTensor(manifest.model_key(name), shape, dtype, load, where))
        if not with_optim:
            continue
        whats = ["exp_avg", "exp_avg_sq"] + (["master"] if dtype != torch.float32 else [])
        for what in whats:
            key = manifest.optim_key(name, what)
            what_dtype, what_load = reader.loader(name, what)
            where = reader.located(name, what)
            tensors.append(LazyTensor(key, shape, what_dtype, what_load, where))
    state = manifest.TrainingState(
        reader.iteration, reader.consumed_samples, config_to_dict(reader.cfg), {}
    )
    layout = {
        "source": "megatron",
        "path": str(Path(src).resolve()),
        "tp": reader.tp,
        "pp": reader.pp,
        "pipeline_blocks": reader.blocks,
    }
    optimizer = manifest.adamw_record(reader.adam_steps, sharded=False) if with_optim else None
    return tensors, state, layout, optimizer


def import_megatron(
    src: Path,
    output: Path,
    *,
    blocks: list[int] | None = None,
    model_cfg: ModelConfig | None = None,
    weights_only: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """A Megatron / Yuan 2.0 checkpoint -> our format (``output/step_<iteration>`` + latest)."""
    reader = MegatronReader(src, blocks=blocks, model_cfg=model_cfg, progress=progress)
    try:
        tensors, state, layout, optimizer = _as_ours(reader, src, weights_only, progress)
        return write_ours(output, tensors, state, layout, optimizer, force=force, progress=progress)
    finally:
        reader.close()


def reshard_megatron(
    src: Path,
    output: Path,
    *,
    tp: int,
    pp: int,
    target_blocks: list[int] | None = None,
    blocks: list[int] | None = None,
    model_cfg: ModelConfig | None = None,
    weights_only: bool = False,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Megatron -> Megatron at another ``tp`` x ``pp`` / ``target_blocks``, directly: each
    whole tensor is read from the source shards and written as the target's shards, with the
    same files as going through our format (``import_megatron`` then ``export_megatron``)."""
    reader = MegatronReader(src, blocks=blocks, model_cfg=model_cfg, progress=progress)
    try:
        tensors, state, layout, optimizer = _as_ours(reader, src, weights_only, progress)
        # As our checkpoint's manifest would read back (JSON), so the files are the same.
        meta = json.loads(json.dumps(manifest.build_meta(state, layout, optimizer)))
        return _export(
            _Source.lazy(tensors), meta, manifest.model_config(meta), Path(output), tp, pp,
            target_blocks,
            weights_only, dtype, force, progress,
        )  # fmt: skip
    finally:
        reader.close()


def verify_megatron(
    ours: Path, megatron: Path, progress: bool = True, blocks: list[int] | None = None
) -> int:
    """Compare every parameter of our checkpoint with the Megatron checkpoint exactly (after
    casting ours to the stored dtype); raise on the first difference. Returns the count.
    ``blocks``: the Megatron checkpoint's split when its args do not record it (``--blocks``)."""

    def open_megatron(cfg: ModelConfig):
        reader = MegatronReader(megatron, model_cfg=cfg, blocks=blocks, progress=False)
        return lambda name: reader.loader(name)[1]()

    return verify_weights(ours, megatron, open_megatron, progress)


def _param_order(state: dict) -> Iterator[tuple[str, ...]]:
    """The paths of a file's parameters in the order of its model dict (optimizer numbering)."""

    def walk(node: dict, prefix: tuple[str, ...]):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, (*prefix, key))
            else:
                yield (*prefix, key)

    return walk(state["model"], ())


def _check_optimizer_layout(state: dict, where: Path) -> None:
    opt = state["optimizer"]
    ok = (
        isinstance(opt, dict)
        and isinstance(opt.get("optimizer"), dict)
        and isinstance(opt["optimizer"].get("state"), dict)
        and isinstance(opt.get("fp32_from_fp16_params"), list)
    )
    n = len(list(_param_order(state)))
    if ok:
        numbered = sorted(i for g in opt["optimizer"].get("param_groups", []) for i in g["params"])
        ok = numbered == list(range(n)) and all(
            {"exp_avg", "exp_avg_sq"} <= set(opt["optimizer"]["state"].get(i, {})) for i in range(n)
        )
    if not ok:
        raise CheckpointError(
            f"{where}: its optimizer state is not the non-distributed mixed-precision layout "
            "this converter reads (per-parameter exp_avg/exp_avg_sq numbered in model order, "
            "fp32_from_fp16_params); convert the weights alone with --weights-only"
        )


def _optimizer_tensor(state: dict, path: tuple[str, ...], what: str, where: Path) -> torch.Tensor:
    index = list(_param_order(state)).index(path)
    opt = state["optimizer"]
    if what == "master":
        for g, group in enumerate(opt["optimizer"]["param_groups"]):
            if index in group["params"]:
                return opt["fp32_from_fp16_params"][g][group["params"].index(index)]
        raise CheckpointError(f"{where}: no fp32 master weight for {'.'.join(path)}")
    return opt["optimizer"]["state"][index][what]
