"""Accelerator presets for the cost model: peak dense bf16 throughput, memory and link bandwidth.

Figures are the vendors' datasheet numbers for dense (not sparse) bf16 tensor-core math;
``memory_bytes`` is the nominal capacity in binary units (an "80 GB" HBM part holds 80 GiB; the
driver and CUDA context take a little of it, which a user can leave out with the balancer's
memory limit). ``link_gbps`` is the default intra-node point-to-point bandwidth in GB/s (1e9
bytes per second) in one direction: NVLink for SXM parts, PCIe 4.0 x16 for the L40S.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from yuanlfa.config import ConfigError

GIB = 2**30
DEFAULT_MFU = 0.45


@dataclass(frozen=True)
class DevicePreset:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (fp16 on parts without bf16)
    memory_bytes: int
    link_gbps: float  # default intra-node P2P bandwidth, GB/s in one direction
    gpu: bool = True


PRESETS: dict[str, DevicePreset] = {
    p.name.lower(): p
    for p in (
        DevicePreset("H100-SXM", 989e12, 80 * GIB, 450.0),
        DevicePreset("H200", 989e12, 141 * GIB, 450.0),
        DevicePreset("A100-80GB", 312e12, 80 * GIB, 300.0),
        DevicePreset("A100-40GB", 312e12, 40 * GIB, 300.0),
        # No bf16 on Volta: the fp16 tensor-core peak.
        DevicePreset("V100-32GB", 125e12, 32 * GIB, 150.0),
        DevicePreset("L40S", 362e12, 48 * GIB, 32.0),
        # A nominal host: for planning the CPU test runs, not a measured figure.
        DevicePreset("cpu", 1e12, 64 * GIB, 10.0, gpu=False),
    )
}


# Names by memory size, as a cluster description names its device kinds.
ALIASES: dict[str, str] = {
    "h100-80g": "h100-sxm",
    "h200-141g": "h200",
    "a100-80g": "a100-80gb",
    "a100-40g": "a100-40gb",
    "v100-32g": "v100-32gb",
    "l40s-48g": "l40s",
}


def find_device(name: str) -> DevicePreset | None:
    """The preset named ``name`` or one of its :data:`ALIASES` (case-insensitive), or None."""
    key = name.strip().lower()
    return PRESETS.get(ALIASES.get(key, key))


def device_names() -> str:
    return ", ".join(list(ALIASES) + [p.name for p in PRESETS.values()])


def get_device(name: str) -> DevicePreset:
    """The preset named ``name`` (case-insensitive); ConfigError listing the names otherwise."""
    preset = find_device(name)
    if preset is None:
        raise ConfigError(f"device {name!r} is not a known preset; choose one of {device_names()}")
    return preset


# Patterns over torch.cuda.get_device_name() strings, most specific first. Variants with other
# clocks or memory (H100 PCIe / NVL, A100 PCIe 40GB is the same chip as SXM 40GB) are matched
# only where the preset's figures hold for them.
_CUDA_NAMES: tuple[tuple[str, str], ...] = (
    (r"\bH200\b", "H200"),
    (r"\bH100\b(?!.*(PCIE|NVL))", "H100-SXM"),
    (r"\bA100\b.*80\s*GB", "A100-80GB"),
    (r"\bA100\b", "A100-40GB"),
    (r"\bV100\b.*32\s*GB", "V100-32GB"),
    (r"\bL40S\b", "L40S"),
)


def device_from_cuda_name(cuda_name: str) -> DevicePreset | None:
    """Map ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3") to a preset, or None
    when no preset describes that part."""
    text = cuda_name.upper()
    for pattern, preset in _CUDA_NAMES:
        if re.search(pattern, text):
            return PRESETS[preset.lower()]
    return None
