"""Typed, validated experiment configuration (see schema.py for every key)."""

from budgetlora.config.load import (PATH_KEYS, build_section, check_values, coerce_value, config_from_dict, config_yaml, flatten,
                                    load_config, parse_override, read_yaml, reference_markdown, resolve_paths,
                                    set_dotted)
from budgetlora.config.schema import (REPORT_TO, RUN_NAME_PATTERN, SECTIONS, TARGET_NAMES, Config, DataConfig, HeadConfig,
                                      LoraSettings, PredictionBatch, TrainConfig, fields_by_key, help_for)

__all__ = ["SECTIONS", "Config", "DataConfig", "HeadConfig", "LoraSettings", "PredictionBatch", "TrainConfig", "TARGET_NAMES", "REPORT_TO",
           "RUN_NAME_PATTERN", "PATH_KEYS", "build_section", "check_values", "coerce_value", "config_from_dict", "config_yaml", "fields_by_key",
           "flatten", "help_for", "load_config", "parse_override", "read_yaml", "reference_markdown",
           "resolve_paths", "set_dotted"]
