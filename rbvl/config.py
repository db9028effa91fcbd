"""Typed configuration: defaults ← YAML ← `key=value` overrides, one validation layer for every field.

Every stage has a dataclass; each field is documented once, where it is defined (the attribute docstring is what
`rbvl train --help-config` and `rbvl-regroup --help` print), and declares what it allows with `option(...)`:
a range (`ge`, `gt`, `le`, `lt`), a choice set, or a check. The values are coerced and checked in `__post_init__`,
so a config built from a recipe, from overrides or directly in Python is checked once, the same way
(`rbvl validate` and `rbvl train` agree). A bad value raises `ConfigError` with one line naming the key, the value
and what is allowed:

    load_config("recipes/demo_tiny_rnb.yaml", ["balance.lam=5"])   # → a validated RunConfig
    load_config(None, ["train.batch_size=0"])   # ConfigError: train.batch_size: got 0, expected an int >= 1

Numbers accept YAML and Python notation (`1e-3`, `1E-3`, `1_000`, `.5`, `2.0` for an int); bools accept
true/false/yes/no/on/off/1/0.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


# Keys of earlier versions that are accepted and ignored (with a warning), so old run folders still load.
REMOVED_KEYS = {"train.compile": "it was never used"}


# ---------------------------------------------------------------------------------------------------------------------
# Declaring what a field allows
# ---------------------------------------------------------------------------------------------------------------------


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    check: Callable[[Any], str | None] | None = None,
    allowed: str | None = None,
):
    """A dataclass field with its allowed values: a range, a choice set, or `check(value)` → error text or None.

    `allowed` describes a `check` in words for messages and --help ("a regex", "cpu, cuda or cuda:N").
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "check": check, "allowed": allowed}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Checked:
    """Mixin: coerce and check every field in `__post_init__`. `KEY` is the section's prefix in messages."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.KEY)


def check_fields(obj, prefix: str = "") -> None:
    """Coerce each (non-section) field of dataclass `obj` to its annotation, then check its declared range."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue
        name = f"{prefix}{f.name}"
        value = coerce(name, getattr(obj, f.name), hint)
        _check_range(name, value, f.metadata)
        object.__setattr__(obj, f.name, value)


def allowed_text(f: dataclasses.Field, hint: Any) -> str:
    """What field `f` allows, in words: `an int >= 1`, `one of truncate, drop`, `a float in [0, 1)`."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join("null" if c is None else str(c) for c in m["choices"])
    if m.get("allowed"):
        return m["allowed"]
    kind = {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(_scalar(hint))
    kind = kind or _type_name(hint)
    lo = ("ge", ">=", "["), ("gt", ">", "(")
    hi = ("le", "<=", "]"), ("lt", "<", ")")
    low = next(((m[k], op, br) for k, op, br in lo if m.get(k) is not None), None)
    high = next(((m[k], op, br) for k, op, br in hi if m.get(k) is not None), None)
    if low and high:
        return f"{kind} in {low[2]}{_num(low[0])}, {_num(high[0])}{high[2]}"
    if low:
        return f"{kind} {low[1]} {_num(low[0])}"
    if high:
        return f"{kind} {high[1]} {_num(high[0])}"
    return kind


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    if not meta:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        shown = [str(c) for c in choices if c is not None]
        close = difflib.get_close_matches(str(value), shown, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(_show(c) for c in choices)}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bad = (
            (meta.get("ge") is not None and not value >= meta["ge"])
            or (meta.get("gt") is not None and not value > meta["gt"])
            or (meta.get("le") is not None and not value <= meta["le"])
            or (meta.get("lt") is not None and not value < meta["lt"])
        )
        if bad:
            kind = "an int" if isinstance(value, int) else "a number"
            raise ConfigError(f"{name}: got {value!r}, expected {_range_words(kind, meta)}")
    check = meta.get("check")
    if check is not None and value is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{name}: got {value!r}, {problem}")


def _range_words(kind: str, meta: typing.Mapping) -> str:
    fake = dataclasses.field(metadata={k: meta.get(k) for k in ("ge", "gt", "le", "lt")})
    return allowed_text(fake, int if kind == "an int" else float)


def _show(c: Any) -> str:
    return "null" if c is None else str(c).lower() if isinstance(c, bool) else str(c)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---------------------------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------------------------


def _regex_or_names(value: str | list[str]) -> str | None:
    if isinstance(value, list):
        return "expected at least one module name" if not value else None
    if not value:
        return "expected a regex or a list of module names"
    try:
        re.compile(value)
    except re.error as e:
        return f"not a valid regex ({e})"
    return None


def _nonempty(value: str) -> str | None:
    return "expected a non-empty string" if not str(value).strip() else None


def _device(value: str) -> str | None:
    ok = re.fullmatch(r"auto|cpu|mps|meta|(cuda|xpu|npu|hpu)(:\d+)?", value)
    return None if ok else "expected auto, cpu, mps, cuda or cuda:N"


def _attn(value: str | None) -> str | None:
    known = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
    if value is None or value in known or "/" in value:  # `org/kernel`: a hub kernel, as transformers allows
        return None
    return f"expected one of {', '.join(known)}, a hub kernel `org/name`, or null"


def _betas(value: list[float]) -> str | None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        return "expected two numbers in [0, 1), e.g. [0.9, 0.999]"
    return None


def _weights(value: dict[str, float]) -> str | None:
    if any(not w >= 0 for w in value.values()):
        return "expected non-negative weights"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(Checked):
    KEY: ClassVar[str] = "model."

    name: str = option("tiny-llava", check=_nonempty, allowed="a hub id, a folder, or tiny-llava")
    """A hub id (`llava-hf/llava-1.5-7b-hf`), a local `save_pretrained` folder, or `tiny-llava` (built offline)."""
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    """Weights dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; off unless you trust the checkpoint's code."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (LoRA and the projector train)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (enables PEFT's input-grads fix)."""
    attn_implementation: str | None = option(None, check=_attn, allowed="eager, sdpa, flash_attention_2, ... or null")
    """`eager`, `sdpa`, `flash_attention_2`; None lets transformers choose."""
    init_seed: int = option(-1, ge=-1)
    """Seed of a tiny model's random weights; -1 = the run's `seed`. Fix it to compare seeds on one base model, as
    runs of a pretrained checkpoint are (only data order, adapter init and dropout then change with `seed`)."""


@dataclass
class LoraConfig(Checked):
    """Maps 1:1 onto `peft.LoraConfig`."""

    KEY: ClassVar[str] = "lora."

    enabled: bool = True
    """Train LoRA adapters; when False the language model trains in full (small models only)."""
    r: int = option(8, ge=1)
    """Adapter rank."""
    lora_alpha: int = option(16, ge=1)
    """Scaling numerator: the adapter's output is multiplied by lora_alpha / r."""
    lora_dropout: float = option(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: str | list[str] | None = option(
        None, check=_regex_or_names, allowed="a regex, a list of names, or null (the model family's)"
    )
    """A regex or a list of names. None: the model family's regex (rbvl/families.py), the language model's attention
    projections only (e.g. `.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)`): bare names would also hit the vision
    tower, whose attention shares them."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter. None: the family's projector (`multi_modal_projector`,
    Qwen2-VL's `merger`, Idefics3's `connector`; none for a text-only LM), as in LLaVA stage 2."""


@dataclass
class DataConfig(Checked):
    KEY: ClassVar[str] = "data."

    max_length: int = option(512, ge=2)
    """Tokens per sample, image tokens included (at least 2: a prompt token and a label)."""
    overlong: str = option("truncate", choices=("truncate", "drop"))
    """What to do with a longer sample: `truncate` (keep the first max_length tokens) or `drop` (skip it). Counted."""
    num_workers: int = option(0, ge=0)
    """DataLoader workers that read and decode shards (0 = in the training process)."""
    prefetch_factor: int = option(2, ge=1)
    """Batches each worker prepares ahead; with `num_workers` it bounds how late a new p reaches the data."""
    shuffle_buffer: int = option(100, ge=0)
    """Per-domain shuffle buffer (samples; 0 or 1 = no buffer)."""


@dataclass
class OdmConfig(Checked):
    """Online Data Mixing (Albalak et al. 2023): EXP3 over domains with the training loss as reward."""

    KEY: ClassVar[str] = "mixing.odm."

    alpha: float = option(0.9, ge=0.0, lt=1.0)
    """α in the smoothed reward R̂_i ← α·R̂_i + (1 − α)·L_i/π_i (the authors' final 1B run used 0.5)."""
    warmup_steps: int = option(0, ge=0)
    """Steps on the initial p before EXP3 moves it (rewards still accumulate); the authors used 2% of training."""
    update_every: int = option(1, ge=1)
    """Optimizer steps between updates of p (the authors: every step)."""
    reward_scale: float = option(1.0, gt=0.0)
    """Multiplies the loss before it becomes a reward (the authors' plain EXP3 code divides by 10: 0.1)."""


@dataclass
class DgaConfig(Checked):
    """Gradient alignment (DoGE / DGA, Fan et al. 2024): extra backward passes on held-out batches."""

    KEY: ClassVar[str] = "mixing.dga."

    update_every: int = option(1, ge=1)
    """Optimizer steps between updates (DoGE: every step); each costs m + 1 extra forward + backward passes."""
    batch_size: int = option(8, ge=1)
    """Samples per domain (and of the target) in each extra pass."""
    mu: float = option(0.01, gt=0.0)
    """μ: p ← softmax(log p + scores/μ) (DoGE's default)."""
    dw_min: float = option(0.0, ge=0.0)
    """Scores are clipped to [lr·dw_min, lr·dw_max] (DoGE: 0 and 5)."""
    dw_max: float = option(5.0, ge=0.0)
    """Upper clip of the scores, in units of the learning rate (DoGE: 5)."""
    smoothing: float = option(0.0, ge=0.0, lt=1.0)
    """Mix (1 − s)·p + s/m after each update (DoGE's reweight_eps, 0 by default)."""
    max_grad_norm: float = option(5.0, ge=0.0)
    """Each domain gradient is clipped to this norm before the alignment (DoGE: 5; 0 = off)."""


@dataclass
class DoremiConfig(Checked):
    """DoReMi (Xie et al. 2023): excess loss over a reference model, exponentiated-gradient update."""

    KEY: ClassVar[str] = "mixing.doremi."

    eta: float = option(1.0, gt=0.0)
    """η: p ← softmax(log p + η·λ) (the paper's value)."""
    smoothing: float = option(1e-3, ge=0.0, lt=1.0)
    """c: p ← (1 − c)·p + c/m after each update (the paper's value)."""
    update_every: int = option(1, ge=1)
    """Optimizer steps between updates (the paper: every step)."""


@dataclass
class AioliConfig(Checked):
    """Aioli (Chen et al. 2024): LearnParams rounds, interaction matrix, exponentiated-gradient update."""

    KEY: ClassVar[str] = "mixing.aioli."

    eta: float = option(0.2, gt=0.0)
    """η: p ∝ exp(η · qᵀA) (the authors' Aioli-unrestricted runs)."""
    update_steps: int = option(250, ge=1)
    """Optimizer steps per round, LearnParams included (the authors: 250 of 5,000)."""
    lp_rounds: int = option(4, ge=1)
    """Sweeps over the domains in each LearnParams."""
    lp_steps: int = option(4, ge=1)
    """Training steps on each perturbed mixture before an eval-loss measurement."""
    one_hot_factor: float = option(0.625, gt=0.0, le=1.0)
    """Share of the perturbed domain in its LearnParams mixture (the rest spread evenly)."""
    ema: float = option(0.1, ge=0.0, lt=1.0)
    """Ā ← (1 − ema)·A + ema·Ā_prev; 0 = no smoothing, and the weights then compound round over round."""
    normalize_a: bool = True
    """Shift A to be non-negative and divide by its sum before the update (the authors' `aioli_normalize_A`)."""


MIXING_STRATEGIES = ("stratified", "natural", "manual", "rnb", "odm", "dga", "doremi", "aioli")


@dataclass
class MixingConfig(Checked):
    KEY: ClassVar[str] = "mixing."

    strategy: str = option("rnb", choices=MIXING_STRATEGIES)
    """`stratified` (uniform over domains), `natural` (by domain size), `manual` (`weights`), `rnb` (R&B Balance), or
    a peer for comparison: `odm` (Online Data Mixing), `dga` (gradient alignment, DoGE/DGA), `doremi` (needs
    `reference`), `aioli`. See rbvl/mixing.py."""
    weights: dict[str, float] = option(factory=dict, check=_weights, allowed="domain → weight >= 0")
    """For `manual`: domain name (e.g. `cluster_003`) or index → weight; normalised; missing domains get 0."""
    reference: str = ""
    """For `doremi`: the run folder of a finished reference run on the same domains (its final checkpoint)."""
    odm: OdmConfig = field(default_factory=OdmConfig)
    """Online Data Mixing's settings (`mixing.strategy=odm`)."""
    dga: DgaConfig = field(default_factory=DgaConfig)
    """Gradient alignment's settings (`mixing.strategy=dga`)."""
    doremi: DoremiConfig = field(default_factory=DoremiConfig)
    """DoReMi's settings (`mixing.strategy=doremi`)."""
    aioli: AioliConfig = field(default_factory=AioliConfig)
    """Aioli's settings (`mixing.strategy=aioli`)."""

    def __post_init__(self):
        super().__post_init__()
        if self.strategy == "manual" and not any(w > 0 for w in self.weights.values()):
            raise ConfigError(
                f"mixing.weights: got {self.weights!r}, expected at least one domain with a positive weight "
                "when mixing.strategy=manual"
            )
        if self.strategy == "doremi" and not self.reference:
            raise ConfigError("mixing.reference: got '', expected a finished run folder when mixing.strategy=doremi")


@dataclass
class BalanceConfig(Checked):
    """R&B Balance: p ← softmax(λ · G q / ‖G q‖) every `update_every` optimizer steps."""

    KEY: ClassVar[str] = "balance."

    update_every: int = option(20, ge=1)
    """K: optimizer steps per window. The paper updated a handful of times per run (about every tenth of training)."""
    lam: float = option(3.0, ge=0.0)
    """λ: how far p may move from uniform (0 keeps p uniform; the paper used 3 on S1-59k)."""
    params: str | list[str] = option("lora", check=_regex_or_names, allowed="lora, head, or regexes")
    """Tracked parameters: `lora` (the adapters), `head` (LM head and projector: the paper's last layer), or regexes."""
    warmup_steps: int = option(0, ge=0)
    """Optimizer steps with uniform p before the first window starts."""
    floor: float = option(0.0, ge=0.0, lt=1.0)
    """Lower bound on each p_i after an update (0 = off)."""
    smoothing: float = option(0.0, ge=0.0, lt=1.0)
    """s in p ← (1−s)·p_new + s·p_old (0 = off: as the paper, p comes from the current window alone)."""
    sketch_dim: int = option(0, ge=0)
    """Keep each domain's gradient in a seeded count sketch of this many numbers (0 = exact: m × tracked params).
    Inner products stay unbiased; memory is 2 × m × sketch_dim floats whatever the model (see docs/balance.md)."""


@dataclass
class OptimConfig(Checked):
    """AdamW with linear warmup and cosine decay."""

    KEY: ClassVar[str] = "optim."

    lr: float = option(2e-4, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = option(0.0, ge=0.0)
    """AdamW's decoupled weight decay."""
    betas: list[float] = option(factory=lambda: [0.9, 0.999], check=_betas, allowed="two numbers in [0, 1)")
    """AdamW's (β1, β2)."""
    warmup_steps: int = option(10, ge=0)
    """Linear learning-rate warmup, then cosine decay to `min_lr_ratio` · lr at max_steps."""
    min_lr_ratio: float = option(0.1, ge=0.0, le=1.0)
    """The learning rate at max_steps, as a fraction of lr."""
    max_grad_norm: float = option(1.0, ge=0.0)
    """Gradient clipping (0 = off)."""


@dataclass
class TrainConfig(Checked):
    KEY: ClassVar[str] = "train."

    batch_size: int = option(8, ge=1)
    """Samples per micro-batch (per rank)."""
    grad_accum: int = option(1, ge=1)
    """Micro-batches per optimizer step."""
    precision: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"))
    """`auto` (bf16 autocast on a GPU that has it, else fp32), `fp32`, `bf16`, `fp16`."""
    log_every: int = option(5, ge=1)
    """Optimizer steps between train rows in metrics.jsonl (and the progress bar's loss)."""
    save_every: int = option(0, ge=0)
    """Optimizer steps between checkpoints (0 = only at the end)."""
    device: str = option("auto", check=_device, allowed="auto, cpu, mps, cuda or cuda:N")
    """`auto`, `cpu`, `cuda`, `cuda:1` ..."""


@dataclass
class EvalConfig(Checked):
    KEY: ClassVar[str] = "eval."

    every: int = option(0, ge=0)
    """Optimizer steps between evaluations (0 = only at the end)."""
    batch_size: int = option(16, ge=1)
    """Samples per eval batch."""
    max_samples: int = option(0, ge=0)
    """Per domain (0 = the whole eval shard set)."""


@dataclass
class LoggingConfig(Checked):
    KEY: ClassVar[str] = "logging."

    tensorboard: bool = True
    """Mirror metrics.jsonl to TensorBoard event files in OUTPUT_DIR/tensorboard."""
    plots: bool = True
    """Write proportions.png, eval_loss.png and gram.png at the end of the run."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class RunConfig(Checked):
    output_dir: str = option("runs/default", check=_nonempty, allowed="a folder path")
    """The run folder: resolved config, metrics, plots, checkpoints. One run at a time owns it (a lock file)."""
    max_steps: int = option(100, ge=1)
    """Optimizer steps."""
    seed: int = option(0, ge=0)
    """Seeds the adapters' init, dropout and every draw of the mixture stream."""
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


def read_yaml(path: str | Path, what: str = "recipe") -> dict:
    """The mapping in the YAML file at `path` (`what` names it in errors: recipe, config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys, got {type(tree).__name__}")
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
    """Build dataclass `cls` from a nested dict: unknown keys are errors; values are coerced and checked by `cls`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in fields:
            if name in REMOVED_KEYS:
                log.warning("ignoring '%s': the key was removed (%s)", name, REMOVED_KEYS[name])
                continue
            raise ConfigError(f"unknown key '{name}'{_suggest(str(key), fields, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value if value is not None else {}, prefix=f"{name}.")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(name: str, value: Any) -> bool:
    """true/false/yes/no/on/off/1/0 (any case), or a bool or the ints 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: expected bool (true/false, yes/no, 1/0), got {value!r}")


def parse_number(name: str, value: Any, kind: type) -> int | float:
    """An int or float from any YAML or Python notation: 3, 3.0, '1e-3', '1E3', '1_000', '.5', '0x10'."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text, 0)
        except ValueError:
            try:
                number = int(text)  # '010'
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if not isinstance(number, (int, float)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{name}: got {value!r}, expected a finite number")
    if kind is int:
        if isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{name}: expected int, got {value!r}")
            number = int(number)
        return number
    return float(number)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the annotation `hint` says: numbers and bools from any notation, str from a number, lists, dicts."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # Try the exact type first, so `str | list[str]` keeps a list a list and a string a string.
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: not _matches(value, a))
        for option_ in ordered:
            try:
                return coerce(name, value, option_)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected None, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        return [coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {str(k) if key_t is str else k: coerce(f"{name}.{k}", v, val_t) for k, v in value.items()}
    if hint is bool:
        return parse_bool(name, value)
    if hint in (int, float):
        return parse_number(name, value, hint)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `output_dir=2024` is a folder name
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected str, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (what `rbvl train` saves into the run and every checkpoint)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, what it allows, default, doc) for every field, read from the attribute docstrings in this file."""
    docs = attribute_docs(cls)
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, prefix=f"{prefix}{f.name}.")
            continue
        rows.append((f"{prefix}{f.name}", allowed_text(f, hint), field_default(f), docs.get(f.name, "")))
    return rows


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


# ---------------------------------------------------------------------------------------------------------------------
# Command-line flags generated from a dataclass (rbvl-regroup)
# ---------------------------------------------------------------------------------------------------------------------


def add_flags(parser, cls: type, defaults: dict[str, str] | None = None) -> None:
    """One `--flag` per field of `cls` (underscores → dashes), its help from the attribute docstring.

    Flags keep the raw text (`argparse.SUPPRESS` leaves absent ones out), so `cls` coerces and checks them like
    any other value. A list field takes several values; a bool field takes an optional true/false and has a
    `--no-` twin.
    """
    docs = attribute_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, _show(field_default(f)))
        text = f"{docs.get(f.name, '')} [{allowed_text(f, hint)}; default {default}]".replace("%", "%%")
        if _scalar(hint) is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", metavar="BOOL", help=text)
            parser.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_const", const="false", help="")
        elif typing.get_origin(_strip_none(hint)) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", metavar=f.name.upper(), help=text)
        else:
            parser.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=text)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _scalar(hint: Any) -> Any:
    hint = _strip_none(hint)
    return hint if hint in (int, float, bool, str) else None


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and isinstance(value, origin) and not (origin is int and isinstance(value, bool))


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


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
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
