"""Does a config fit its devices? Each pipeline rank's predicted peak memory (weights, gradients,
optimizer state, activations at the schedule's peak and the largest transient workspace, from
:mod:`.cost`) against one device's memory, and when it does not fit, by how much and which one
setting would make it fit.

The knobs tried, each alone on top of the config, cheapest in time first: more recompute (block
recompute of more layers per stage, then full recompute of every layer), the memory-feasible
split of the layers over the same stages (the balancer's), the distributed optimizer (dp > 1),
a smaller micro-batch, more pipeline stages (twice as many ranks). ``yuanlfa-info`` prints the
verdict; ``yuanlfa-train`` stops with it before building anything on the GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from yuanlfa.config import Config, ConfigError, resolve
from yuanlfa.planner.balance import best_blocks
from yuanlfa.planner.cost import cost_model
from yuanlfa.planner.stages import config_blocks

GIB = 2**30


@dataclass(frozen=True)
class Knob:
    """One setting (``key=value`` as ``--set`` takes it) and the peak it gives."""

    setting: str
    peak_bytes: int


@dataclass(frozen=True)
class FitReport:
    device_bytes: int
    rank_bytes: tuple[int, ...]  # predicted peak of each pipeline rank
    knobs: tuple[Knob, ...] = ()  # settings that make it fit (empty when it fits)

    @property
    def peak_bytes(self) -> int:
        return max(self.rank_bytes)

    @property
    def worst_rank(self) -> int:
        return self.rank_bytes.index(self.peak_bytes)

    @property
    def margin_bytes(self) -> int:
        """Device memory left at the fullest rank (negative: over by that much)."""
        return self.device_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0

    def verdict(self) -> str:
        """One line: fits with the margin, or over by how much and what would fit."""
        have, need = self.device_bytes / GIB, self.peak_bytes / GIB
        where = f"pipeline rank {self.worst_rank} needs {need:.1f} GiB of {have:.1f} GiB"
        if self.fits:
            return f"fits: {where} ({self.margin_bytes / GIB:.1f} GiB to spare)"
        over = f"does not fit: {where} ({-self.margin_bytes / GIB:.1f} GiB over)"
        if not self.knobs:
            return (
                f"{over}; no single setting tried makes it fit (recompute, the balanced split, "
                "the distributed optimizer, a smaller micro-batch, twice the pipeline stages): "
                "combine them, raise parallel.tp, or use devices with more memory"
            )
        fixes = ", or ".join(f"{k.setting} ({k.peak_bytes / GIB:.1f} GiB)" for k in self.knobs)
        return f"{over}; it fits with {fixes}"


def rank_peaks(cfg: Config, blocks: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Predicted peak bytes of each pipeline rank of a resolved ``cfg`` (its configured split
    unless ``blocks``)."""
    blocks = config_blocks(cfg) if blocks is None else blocks
    # The device the run will have, not the machine asking (yuanlfa-info on a login node).
    gpu = cfg.train.device != "cpu"
    return tuple(r.memory_bytes for r in cost_model(cfg, gpu=gpu).evaluate(blocks).ranks)


def fit_report(cfg: Config, device_gib: float) -> FitReport:
    """The verdict for a resolved ``cfg`` on devices of ``device_gib`` GiB each."""
    device = int(device_gib * GIB)
    report = FitReport(device, rank_peaks(cfg))
    if report.fits:
        return report
    return dataclasses.replace(report, knobs=tuple(_knobs(cfg, device)))


def require_fit(cfg: Config, device_gib: float | None) -> FitReport | None:
    """Raise ConfigError with the verdict when a resolved ``cfg`` does not fit; None when the
    device memory is unknown."""
    if device_gib is None:
        return None
    report = fit_report(cfg, device_gib)
    if not report.fits:
        raise ConfigError(
            f"train.device_memory_gb: {report.verdict()} (predicted by the planner before "
            "allocating anything; set train.device_memory_gb to check against another size)"
        )
    return report


def _peak(cfg: Config, world: int) -> int | None:
    """The peak of a variant, or None when the variant is not a valid config."""
    try:
        return max(rank_peaks(resolve(cfg, world)))
    except ConfigError:
        return None


def _knobs(cfg: Config, device: int) -> list[Knob]:
    p, t = cfg.parallel, cfg.train
    dp = p.dp or 1
    world = p.tp * p.pp * p.cp * dp
    found: list[Knob] = []

    def attempt(setting: str, variant: Config, variant_world: int = world) -> bool:
        peak = _peak(variant, variant_world)
        if peak is not None and peak <= device:
            found.append(Knob(setting, peak))
            return True
        return False

    # Recompute: block recompute of the fewest layers per stage that fits (more than now when
    # already under block), else every layer.
    train = dataclasses.replace(t, recompute_stages=None)
    most = max(config_blocks(cfg))
    if not (t.recompute == "full" and t.recompute_method == "uniform"):
        block = t.recompute == "full" and t.recompute_method == "block"
        first = t.recompute_num_layers + 1 if block else 1
        for n in range(first, most):
            variant = dataclasses.replace(
                train, recompute="full", recompute_method="block", recompute_num_layers=n
            )
            setting = f"train.recompute_num_layers={n}"
            if not block:
                setting = f"train.recompute=full train.recompute_method=block {setting}"
            if attempt(setting, dataclasses.replace(cfg, train=variant)):
                break
        else:
            variant = dataclasses.replace(
                train, recompute="full", recompute_method="uniform", recompute_num_layers=1
            )
            attempt(
                "train.recompute=full train.recompute_method=uniform train.recompute_num_layers=1",
                dataclasses.replace(cfg, train=variant),
            )
    # The balanced split: the fastest block list whose every rank fits.
    if p.pp > 1:
        try:
            blocks = best_blocks(cost_model(cfg, memory_limit_bytes=device), "time")
        except ConfigError:
            blocks = None
        if blocks is not None:
            peak = max(rank_peaks(cfg, blocks))
            if peak <= device:
                found.append(Knob(f"parallel.pipeline_blocks={list(blocks)}", peak))
    if dp > 1 and not cfg.optim.distributed:
        optim = dataclasses.replace(cfg.optim, distributed=True)
        attempt("optim.distributed=true", dataclasses.replace(cfg, optim=optim))
    micro = t.micro_batch_size // 2
    while micro >= 1:
        variant = dataclasses.replace(train, micro_batch_size=micro)
        if attempt(f"train.micro_batch_size={micro}", dataclasses.replace(cfg, train=variant)):
            break
        micro //= 2
    pp = 2 * p.pp
    if pp * p.virtual_stages <= cfg.model.num_layers:
        parallel = dataclasses.replace(p, pp=pp, pipeline_blocks=None, pipeline_layout=None)
        variant = dataclasses.replace(cfg, parallel=parallel, train=train)
        attempt(f"parallel.pp={pp} (even split, {world * 2} ranks)", variant, world * 2)
    return found


def fit_summary(cfg: Config) -> dict | None:
    """The verdict for train.device_memory_gb as yuanlfa-info's JSON shows it (None: unset)."""
    gib = cfg.train.device_memory_gb
    if gib is None:
        return None
    report = fit_report(cfg, gib)
    return {
        "device_memory_gb": gib,
        "fits": report.fits,
        "pipeline_rank": report.worst_rank,
        "peak_bytes": report.peak_bytes,
        "margin_bytes": report.margin_bytes,
        "knobs": [{"setting": k.setting, "peak_bytes": k.peak_bytes} for k in report.knobs],
        "verdict": report.verdict(),
    }
