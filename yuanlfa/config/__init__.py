"""Configuration: frozen dataclasses (``schema``), a strict YAML loader with dotted overrides
(``load``) and validation (``validate``).

The bottom of the house: imports nothing else of the library and runs without torch.
"""

from yuanlfa.config.blend import parse_blend
from yuanlfa.config.load import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)
from yuanlfa.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    EmulateConfig,
    LoggingConfig,
    ModelConfig,
    NodeGroupConfig,
    OptimConfig,
    OuterConfig,
    ParallelConfig,
    TrainConfig,
)
from yuanlfa.config.split import (
    blocks_problem,
    configured_blocks,
    parse_layout_string,
    uneven_problem,
)
from yuanlfa.config.validate import resolve, tp_indivisible, validate

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "EmulateConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "NodeGroupConfig",
    "OptimConfig",
    "OuterConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "blocks_problem",
    "config_from_dict",
    "config_to_dict",
    "configured_blocks",
    "load_config",
    "parse_blend",
    "parse_layout_string",
    "parse_override",
    "resolve",
    "tp_indivisible",
    "uneven_problem",
    "validate",
]
