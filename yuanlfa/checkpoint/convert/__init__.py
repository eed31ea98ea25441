"""Conversions between our format and the Megatron / Yuan 2.0 and Hugging Face formats."""

from yuanlfa.checkpoint.convert.hf import INDEX, export_hf, import_hf, verify_hf
from yuanlfa.checkpoint.convert.megatron import (
    TRACKER,
    export_megatron,
    import_megatron,
    verify_megatron,
)

__all__ = [
    "INDEX",
    "TRACKER",
    "export_hf",
    "export_megatron",
    "import_hf",
    "import_megatron",
    "verify_hf",
    "verify_megatron",
]
