"""Run configuration: the schema (``schema``), reading YAML, overrides and stored configs
(``loading``), the rules a config must obey (``validate``) and the differences between two
configs (``differences``).

``load_config("configs/emoji.yaml", ["loss.name=infonce", "data.batch_size=512"])`` returns an
OmegaConf object over :class:`RunConfig`; ``validate(config)`` checks it before a run starts.
"""

from plait.config.differences import UNSET, config_differences, show
from plait.config.loading import (
                                  MAX_YAML_DEPTH,
                                  MAX_YAML_NODES,
                                  PACKAGED,
                                  apply_overrides,
                                  check_components,
                                  first_line,
                                  from_yaml,
                                  load_config,
                                  load_stored_config,
                                  resolve_config_path,
                                  safe_load_bounded,
                                  to_yaml,
)
from plait.config.schema import (
                                  ALWAYS_MAY_CHANGE,
                                  DATA_LOCATION,
                                  NO_EFFECT,
                                  RESUME_MAY_CHANGE,
                                  SCHEDULE_KEYS,
                                  AugmentConfig,
                                  DataConfig,
                                  EvalConfig,
                                  LossConfig,
                                  ModelConfig,
                                  OptimConfig,
                                  RunConfig,
                                  TrainConfig,
)
from plait.config.validate import validate, validate_eval, validate_with_data

__all__ = [
    "ALWAYS_MAY_CHANGE", "AugmentConfig", "DATA_LOCATION", "DataConfig", "EvalConfig", "LossConfig", "MAX_YAML_DEPTH",
    "MAX_YAML_NODES", "ModelConfig", "NO_EFFECT", "OptimConfig", "PACKAGED", "RESUME_MAY_CHANGE", "RunConfig", "SCHEDULE_KEYS",
    "TrainConfig", "UNSET", "apply_overrides", "check_components", "config_differences", "first_line", "from_yaml",
    "load_config", "load_stored_config", "resolve_config_path", "safe_load_bounded", "show", "to_yaml", "validate",
    "validate_eval", "validate_with_data",
]
