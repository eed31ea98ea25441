"""The manifest of a checkpoint (``meta.json``) and the key scheme of its tensors, in one place.

Every checkpoint in our format is a step directory holding the tensors (DCP files), the RNG
states (``rng/tp<i>-pp<j>-dp<k>.pt``, one per rank, by rank coordinates) and ``meta.json``,
written last (a directory without it is incomplete)::

    {"format": "yuanlfa-dcp-v1", "step": ..., "consumed_samples": ...,
     "model_config": {...}, "layout": {...}, "optimizer": {"type": "adamw", "steps": ...,
     "sharded": ...} or null, ...run settings (``TrainingState.extra``)}

Tensor keys: ``model.<name>`` (parameters under their global name, in their training dtype),
``optim.<name>.exp_avg`` / ``optim.<name>.exp_avg_sq`` (AdamW moments, fp32) and
``optim.<name>.master`` (fp32 master weights, when the parameters are kept in lower precision).
This module is the only code that writes or reads ``meta.json`` or spells these names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.config import ModelConfig, config_to_dict

FORMAT = "yuanlfa-dcp-v1"
META = "meta.json"
RNG_DIR = "rng"
# Model settings that do not change the parameters or their values (plug-in files may move).
IGNORED_MODEL_KEYS = ("lfa_impl", "attention_backend", "loss_block_size", "plugins")
_POSITION = ("format", "step", "consumed_samples", "model_config")


@dataclass
class TrainingState:
    """Where a run is: what the manifest records besides the format, layout and optimizer."""

    step: int
    consumed_samples: int
    model_config: dict[str, Any]
    extra: dict[str, Any]


def model_key(name: str) -> str:
    return f"model.{name}"


def optim_key(name: str, what: str) -> str:
    """``what``: exp_avg, exp_avg_sq or master."""
    return f"optim.{name}.{what}"


def master_key(name: str) -> str:
    return optim_key(name, "master")


def rng_file(path: Path, tp_rank: int, pp_rank: int, dp_rank: int) -> Path:
    """The RNG states of the rank at these coordinates in the checkpoint at ``path``."""
    return path / RNG_DIR / f"tp{tp_rank}-pp{pp_rank}-dp{dp_rank}.pt"


def adamw_record(steps: int, sharded: bool) -> dict[str, Any]:
    """The ``optimizer`` entry of a checkpoint holding AdamW state."""
    return {"type": "adamw", "steps": steps, "sharded": sharded}


def build_meta(
    state: TrainingState, layout: dict[str, Any], optimizer: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest of a checkpoint; ``optimizer`` is None when it holds weights only."""
    return {
        "format": FORMAT,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "model_config": state.model_config,
        "layout": layout,
        "optimizer": optimizer,
        **state.extra,
    }


def is_complete(path: Path) -> bool:
    """A step directory whose manifest is written (the last file of a save)."""
    return (path / META).is_file()


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write and fsync the manifest into ``directory`` (the caller fsyncs the directory)."""
    file = directory / META
    file.write_text(json.dumps(meta, indent=2))
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def read_meta(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, checked to be ours and readable."""
    path = Path(path)
    file = path / META
    if not file.is_file():
        raise CheckpointError(f"{path}: no {META}; not a complete yuanlfa checkpoint")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON manifest ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(meta).__name__}, not a manifest")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; convert it with "
            "yuanlfa-reshard"
        )
    for key in ("step", "consumed_samples", "model_config"):
        if key not in meta:
            raise CheckpointError(f"{file}: no {key!r}; the manifest is incomplete")
    return meta


def model_config(meta: dict[str, Any]) -> ModelConfig:
    """The model a manifest describes."""
    return model_config_from_fields(meta["model_config"])


def model_config_from_fields(fields: dict[str, Any]) -> ModelConfig:
    """A stored model config (our manifest, or the copy a converted file carries); fields this
    version does not know are an error naming them, not a TypeError."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"the stored model config has fields this version of yuanlfa does not know "
            f"({', '.join(unknown)}); it was written by a newer version"
        )
    return ModelConfig(**fields)


def saved_model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest's model config with fields added after it was written at their defaults."""
    return {**config_to_dict(ModelConfig()), **meta.get("model_config", {})}


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Model settings that differ between a checkpoint and a config, those that change the
    parameters only."""
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and k not in IGNORED_MODEL_KEYS
    ]


def adam_steps(meta: dict[str, Any]) -> int:
    """AdamW updates taken before the checkpoint (fewer than steps when some were skipped)."""
    return int((meta.get("optimizer") or {}).get("steps", meta["step"]))


def run_settings(meta: dict[str, Any], section: str) -> dict[str, Any]:
    """A section (``train``, ``optim``...) of the run config saved with the checkpoint; empty for
    an imported one."""
    return meta.get("config", {}).get(section, {})


def training_state(meta: dict[str, Any]) -> TrainingState:
    """The position a manifest records; everything else it holds travels in ``extra``."""
    extra = {k: v for k, v in meta.items() if k not in _POSITION}
    return TrainingState(meta["step"], meta["consumed_samples"], saved_model_config(meta), extra)


# The run settings (``extra["run"]``, recorded by the trainer) a resume may change: the length
# and how the decay span is spelled, within the limits resume_problem checks.
_EXTENDABLE = ("train.steps", "data.order", "optim.decay_steps")


def _decay_span(run: dict[str, Any]) -> int | None:
    """The steps the lr decays over (None: a constant schedule, which has no span)."""
    if run.get("optim.lr_schedule") == "constant":
        return None
    decay = run.get("optim.decay_steps")
    return decay if decay is not None else run.get("train.steps")


def resume_problem(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a run with settings ``current`` cannot continue the run that saved ``saved`` (both
    the trainer's run settings: train.steps, seed, batch, data, lr schedule, ``data.order`` (the
    sample order's signature per dataset, see yuanlfa.data.megatron_index.order_signature));
    None when it can.

    A different ``train.steps`` extends (or shortens) the same run when the lr schedule does not
    move (constant, or ``optim.decay_steps`` spanning the same steps) and the sample order keeps
    its prefix (the same epochs, split the same way); everything else must be unchanged."""
    changed = [
        f"{k} {saved[k]!r} -> {current[k]!r}"
        for k in current
        if k in saved and k not in _EXTENDABLE and saved[k] != current[k]
    ]
    if changed:
        return (
            f"it belongs to a run with other settings ({'; '.join(changed)}); the sample order "
            "and lr schedule depend on them. Restore the settings, or start a new run in another "
            "checkpoint.dir"
        )
    if "train.steps" not in saved:
        # No run record (a checkpoint imported from another format): nothing to continue but
        # the weights and optimizer state, whatever the new run's length.
        return None
    old, new = saved.get("train.steps"), current.get("train.steps")
    if _decay_span(saved) != _decay_span(current):
        what = f"train.steps {old} -> {new}" if old != new else "optim.decay_steps"
        return (
            f"{what} would move the lr schedule (decay over {_decay_span(saved)} -> "
            f"{_decay_span(current)} steps); set optim.decay_steps={_decay_span(saved)} (the "
            "saved run's span) to continue the run"
        )
    if old is None or new is None or old == new:
        return None
    if "data.order" not in saved or saved["data.order"] != current.get("data.order"):
        return (
            f"train.steps {old} -> {new} changes the sample order (the data then spans other "
            f"epochs: {saved.get('data.order')} -> {current.get('data.order')}, as [epochs, "
            "samples before a separately shuffled last epoch] per dataset); keep train.steps, "
            "or start a new run in another checkpoint.dir"
        )
    return None
