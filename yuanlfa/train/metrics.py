"""Step metrics: one console line, one JSON record and TensorBoard scalars per logged step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from yuanlfa.config import ConfigError, LoggingConfig


def check_tensorboard(cfg: LoggingConfig) -> None:
    """Fail before training if TensorBoard logging was asked for but cannot work."""
    if cfg.tensorboard_dir is None:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "logging.tensorboard_dir: the tensorboard package is not installed; "
            "pip install tensorboard (or unset logging.tensorboard_dir)"
        ) from None


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key} [{', '.join(f'{v:.3g}' for v in value)}]"
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.3e}"
        if key in ("tokens_per_s",):
            return f"{key} {value:,.0f}"
        if math.isfinite(value) and abs(value) < 1e4:
            return f"{key} {value:.4f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


# The manifest key under which a checkpoint carries the log record of its own step.
LOG_RECORD = "log_record"


def _open_log(path: Path, start_step: int, start_record: dict[str, Any] | None):
    """A fresh run starts the log anew; a resumed one keeps the records up to its starting step
    (records of steps replayed after a crash would otherwise appear twice). ``start_record`` is
    the record the checkpoint resumed from carries: a process killed between publishing that
    save and appending the record left the log without it. The kept lines are rewritten to a
    temporary file and renamed over the log, so a crash here loses nothing."""
    kept: list[str] = []
    has_start = False
    if start_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:
                continue
            if step <= start_step:
                kept.append(line)
                has_start = has_start or step == start_step
    # Only the record of the step resumed at (an island healed from a live one starts at the
    # live island's step, not at its checkpoint's).
    if start_record is not None and start_record.get("step") == start_step and not has_start:
        kept.append(json.dumps(start_record))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")  # noqa: SIM115


class MetricsLogger:
    """Writes what the process holding the loss sees; other ranks pass enabled=False."""

    def __init__(
        self,
        cfg: LoggingConfig,
        total_steps: int,
        enabled: bool = True,
        start_step: int = 0,
        start_record: dict[str, Any] | None = None,
    ) -> None:
        """start_step: the step a resumed run continues from (0 for a fresh run);
        start_record: the record of that step its checkpoint carries (see _open_log)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if cfg.jsonl:
            Path(cfg.jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = _open_log(Path(cfg.jsonl), start_step, start_record)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(cfg.tensorboard_dir)

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        step = record.get("step")
        if console:
            fields = [f"step {step}/{self.total_steps}"]
            fields += [_fmt(k, v) for k, v in record.items() if k != "step"]
            print(" | ".join(fields), flush=True)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, list):  # per pipeline stage
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"stage/{key}/{i}", v, step)
                elif (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(f"train/{key}" if "eval" not in key else key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
