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


def _open_log(path: Path, start_step: int):
    """A fresh run starts the log anew; a resumed one keeps the records up to its starting step
    (records of steps replayed after a crash would otherwise appear twice)."""
    kept = []
    if start_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    log = open(path, "w", encoding="utf-8")  # noqa: SIM115
    log.writelines(line + "\n" for line in kept)
    return log


class MetricsLogger:
    """Writes what the process holding the loss sees; other ranks pass enabled=False."""

    def __init__(
        self, cfg: LoggingConfig, total_steps: int, enabled: bool = True, start_step: int = 0
    ) -> None:
        """start_step: the step a resumed run continues from (0 for a fresh run)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if cfg.jsonl:
            Path(cfg.jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = _open_log(Path(cfg.jsonl), start_step)
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
