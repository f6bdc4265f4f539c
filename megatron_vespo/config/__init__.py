"""Typed configuration: dataclasses built strictly from YAML (see schema.py for every field)."""
from megatron_vespo.config.loader import apply_overrides, load_model_config, load_run_config
from megatron_vespo.config.schema import (
    AdvantageConfig,
    CorrectionConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    VespoConfig,
)
from typed_config import ConfigError, build, describe_fields, to_dict

__all__ = [
    "AdvantageConfig", "ConfigError", "CorrectionConfig", "LossConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "PrecisionConfig", "RunConfig", "TrainConfig", "VespoConfig", "apply_overrides",
    "build", "describe_fields", "load_model_config", "load_run_config", "to_dict",
]
