"""Typed run configuration: defaults ← recipe YAML ← `key=value` overrides.

Every stage has a dataclass; each field is documented once, where it is defined (the attribute docstring is what
`rbvl train --help-config` prints). `load_config("recipes/demo_tiny_rnb.yaml", ["balance.lam=5"])` returns a
validated `RunConfig`; an unknown or misspelt key, or a value of the wrong type, raises `ConfigError` with one line
that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "tiny-llava"
    """A hub id (`llava-hf/llava-1.5-7b-hf`), a local `save_pretrained` folder, or `tiny-llava` (built offline)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; off unless you trust the checkpoint's code."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (LoRA and the projector train)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (enables PEFT's input-grads fix)."""
    attn_implementation: str | None = None
    """`eager`, `sdpa`, `flash_attention_2`; None lets transformers choose."""

    def __post_init__(self):
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class LoraConfig:
    """Maps 1:1 onto `peft.LoraConfig`."""

    enabled: bool = True
    """Train LoRA adapters; when False the language model trains in full (small models only)."""
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str | list[str] | None = None
    """A regex or a list of names. None: the model family's regex (rbvl/families.py), the language model's attention
    projections only (e.g. `.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)`): bare names would also hit the vision
    tower, whose attention shares them."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter. None: the family's projector (`multi_modal_projector`,
    Qwen2-VL's `merger`, Idefics3's `connector`; none for a text-only LM), as in LLaVA stage 2."""

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")


@dataclass
class DataConfig:
    max_length: int = 512
    """Tokens per sample, image tokens included."""
    overlong: str = "truncate"
    """What to do with a longer sample: `truncate` (keep the first max_length tokens) or `drop` (skip it). Counted."""
    num_workers: int = 0
    """DataLoader workers that read and decode shards."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead; with `num_workers` it bounds how late a new p reaches the data."""
    shuffle_buffer: int = 100
    """Per-domain shuffle buffer (samples)."""


@dataclass
class MixingConfig:
    strategy: str = "rnb"
    """`stratified` (uniform over domains), `natural` (by domain size), `manual` (`weights`), or `rnb` (R&B Balance)."""
    weights: dict[str, float] = field(default_factory=dict)
    """For `manual`: domain name (e.g. `cluster_003`) or index → weight; normalised; missing domains get 0."""

    def __post_init__(self):
        _check_choice("mixing.strategy", self.strategy, ("stratified", "natural", "manual", "rnb"))
        if self.strategy == "manual" and not self.weights:
            raise ConfigError("mixing.weights must name at least one domain when mixing.strategy=manual")
        if any(w < 0 for w in self.weights.values()):
            raise ConfigError("mixing.weights must be non-negative")


@dataclass
class BalanceConfig:
    """R&B Balance: p ← softmax(λ · G q / ‖G q‖) every `update_every` optimizer steps."""

    update_every: int = 20
    """K: optimizer steps per window. The paper updated a handful of times per run (about every tenth of training)."""
    lam: float = 3.0
    """λ: how far p may move from uniform (the paper used 3 on S1-59k)."""
    params: str | list[str] = "lora"
    """Tracked parameters: `lora` (the adapters), `head` (LM head and projector: the paper's last layer), or regexes."""
    warmup_steps: int = 0
    """Optimizer steps with uniform p before the first window starts."""
    floor: float = 0.0
    """Lower bound on each p_i after an update (0 = off)."""
    smoothing: float = 0.0
    """s in p ← (1−s)·p_new + s·p_old (0 = off: as the paper, p comes from the current window alone)."""
    sketch_dim: int = 0
    """Keep each domain's gradient in a seeded count sketch of this many numbers (0 = exact: m × tracked params).
    Inner products stay unbiased; memory is m × sketch_dim whatever the model (see docs/balance.md)."""

    def __post_init__(self):
        if self.update_every <= 0:
            raise ConfigError(f"balance.update_every must be positive, got {self.update_every}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"balance.smoothing must be in [0, 1), got {self.smoothing}")
        if self.floor < 0:
            raise ConfigError(f"balance.floor must be >= 0, got {self.floor}")
        if self.sketch_dim < 0:
            raise ConfigError(f"balance.sketch_dim must be >= 0 (0 = exact), got {self.sketch_dim}")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    """Linear learning-rate warmup, then cosine decay to `min_lr_ratio` · lr at max_steps."""
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Samples per micro-batch (per rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: str = "auto"
    """`auto` (bf16 autocast on a GPU that has it, else fp32), `fp32`, `bf16`, `fp16`."""
    log_every: int = 5
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = only at the end)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:1` ..."""
    compile: bool = False

    def __post_init__(self):
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))


@dataclass
class EvalConfig:
    every: int = 0
    """Optimizer steps between evaluations (0 = only at the end)."""
    batch_size: int = 16
    max_samples: int = 0
    """Per domain (0 = the whole eval shard set)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """The run folder: resolved config, metrics, plots, checkpoints."""
    max_steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    manifest: str = ""
    """Path to the regroup manifest.json (its domains are the clusters)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# Loading: defaults ← YAML ← key=value
# ---------------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig):
    """Defaults ← the YAML at `path` ← `key=value` overrides; returns a validated `cls` instance."""
    tree = read_yaml(path) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return from_dict(cls, tree)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(tree).__name__}")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    """`balance.lam=5` → ("balance.lam", 5); the value is read as YAML, so `[a, b]` is a list and `true` a bool."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
    node[leaf] = value


def from_dict(cls: type, tree: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key '{name}'{_suggest(key, fields, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value if value is not None else {}, prefix=f"{name}.")
        else:
            kwargs[key] = coerce(name, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation `hint`; ints pass where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return coerce(name, value, option)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected None, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        return [coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {str(k) if key_t is str else k: coerce(f"{name}.{k}", v, val_t) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected bool (true/false), got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{name}: expected int, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (what `rbvl train` saves into the run and every checkpoint)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, read from the attribute docstrings in this file."""
    docs = _attribute_docs(cls)
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, prefix=f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", _type_name(hint), default, docs.get(f.name, "")))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(choices)}{hint}")


def _suggest(key: str, fields: dict, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys here: {', '.join(fields)}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass, as litgpt shows them in --help."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
