"""Typed configuration: defaults ← YAML ← `key=value` overrides, one validation layer for every field.

Two parts: the field engine (engine.py: `option`, `Checked`, coercion, checks, did-you-mean, YAML and overrides;
help.py: attribute docstrings → `--help-config` rows and `--flags`), which knows nothing of rbvl, and the schema
(schema.py: one typed section per stage, `RunConfig`, `load_config`). Every field is documented once, where it is
defined, and declares what it allows; a config built from a recipe, from overrides or directly in Python is checked
once, the same way (`rbvl validate` and `rbvl train` agree). A bad value raises `ConfigError` with one line naming
the key, the value and what is allowed:

    load_config("recipes/demo_tiny_rnb.yaml", ["balance.lam=5"])   # → a validated RunConfig
    load_config(None, ["train.batch_size=0"])   # ConfigError: train.batch_size: got 0, expected an int >= 1

Numbers accept YAML and Python notation (`1e-3`, `1E-3`, `1_000`, `.5`, `2.0` for an int); bools accept
true/false/yes/no/on/off/1/0. Importing this package never imports torch, so `rbvl validate` stays instant.
"""

from rbvl.config.checks import check_runnable
from rbvl.config.engine import (
    Checked,
    ConfigError,
    allowed_text,
    check_fields,
    coerce,
    dump_config,
    from_dict,
    load,
    option,
    parse_bool,
    parse_number,
    parse_override,
    read_yaml,
    set_dotted,
    to_dict,
)
from rbvl.config.engine import _hints as _hints  # tests walk the schema's type hints
from rbvl.config.help import add_flags, attribute_docs, field_default
from rbvl.config.schema import (
    MIXING_STRATEGIES,
    AioliConfig,
    BalanceConfig,
    DataConfig,
    DgaConfig,
    DoremiConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    MixingConfig,
    ModelConfig,
    OdmConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    describe,
    load_config,
)

__all__ = [
    "MIXING_STRATEGIES",
    "AioliConfig",
    "BalanceConfig",
    "Checked",
    "ConfigError",
    "DataConfig",
    "DgaConfig",
    "DoremiConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "MixingConfig",
    "ModelConfig",
    "OdmConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "add_flags",
    "allowed_text",
    "attribute_docs",
    "check_fields",
    "check_runnable",
    "coerce",
    "describe",
    "dump_config",
    "field_default",
    "from_dict",
    "load",
    "load_config",
    "option",
    "parse_bool",
    "parse_number",
    "parse_override",
    "read_yaml",
    "set_dotted",
    "to_dict",
]
