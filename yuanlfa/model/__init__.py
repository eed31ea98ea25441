"""Single-device model code (no process groups)."""

from yuanlfa.model.cache import InferenceCache, LayerCache
from yuanlfa.model.generation import generate
from yuanlfa.model.init import build_model, create_model, init_value, materialize, name_seed
from yuanlfa.model.transformer import DecoderLayer, SwiGLU, YuanModel

__all__ = [
    "DecoderLayer",
    "InferenceCache",
    "LayerCache",
    "SwiGLU",
    "YuanModel",
    "build_model",
    "create_model",
    "generate",
    "init_value",
    "materialize",
    "name_seed",
]
