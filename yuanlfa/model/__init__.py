"""Single-device model code (no process groups)."""

from yuanlfa.model.cache import InferenceCache, LayerCache
from yuanlfa.model.generation import generate
from yuanlfa.model.init import build_model, create_model, init_value, materialize
from yuanlfa.model.lfa import LocalizedFiltering
from yuanlfa.model.registry import (
    RegistryError,
    load_plugins,
    register_attention,
    register_filter,
    registered,
)
from yuanlfa.model.seeds import name_seed
from yuanlfa.model.transformer import DecoderLayer, SwiGLU, YuanModel


def registered_filters() -> list[str]:
    """Names accepted by ``model.filter`` (built-ins and imported plug-ins)."""
    return registered("filter")


def registered_attentions() -> list[str]:
    """Names accepted by ``model.attention`` (built-ins and imported plug-ins)."""
    return registered("attention")


__all__ = [
    "DecoderLayer",
    "InferenceCache",
    "LayerCache",
    "LocalizedFiltering",
    "RegistryError",
    "SwiGLU",
    "YuanModel",
    "build_model",
    "create_model",
    "generate",
    "init_value",
    "load_plugins",
    "materialize",
    "name_seed",
    "register_attention",
    "register_filter",
    "registered_attentions",
    "registered_filters",
]
