"""The field engine: dataclass fields that declare what they allow, and the one path every value takes into them.

It knows nothing of rbvl's sections (rbvl/config/schema.py declares those; rbvl/regroup/options.py declares its own).
A field says what it allows with `option(...)`: a range (`ge`, `gt`, `le`, `lt`), a choice set, or a check. A
`Checked` dataclass coerces every field to its annotation and checks it in `__post_init__`, so a value from YAML,
from a `key=value` override, from a `--flag` or from Python is checked once, the same way; a bad one raises
`ConfigError` with one line naming the key, the value and what is allowed (with a did-you-mean for a near miss).

    cfg = load(MyConfig, "my.yaml", ["section.key=5"])   # defaults ← YAML ← key=value, validated

The fields' attribute docstrings become `--help` text in rbvl/config/help.py.

Numbers accept YAML and Python notation (`1e-3`, `1E-3`, `1_000`, `.5`, `2.0` for an int); bools accept
true/false/yes/no/on/off/1/0.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


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
    """Mixin: coerce and check every field in `__post_init__`. `KEY` is the section's prefix in messages.

    `REMOVED_KEYS` maps keys that earlier versions had to why they went: `from_dict` accepts and ignores them (with
    a warning), so old recipes and run folders still load.
    """

    KEY: ClassVar[str] = ""
    REMOVED_KEYS: ClassVar[Mapping[str, str]] = {}

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
# Loading: defaults ← YAML ← key=value
# ---------------------------------------------------------------------------------------------------------------------


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, what: str = "recipe"):
    """Defaults ← the YAML at `path` ← `key=value` overrides; returns a validated `cls` instance."""
    tree = read_yaml(path, what) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        if path and overrides and _same_error(cls, read_yaml(path, what), e):
            raise ConfigError(f"{path}: {e}") from None  # the file's own mistake: name the file
        if path and not overrides:
            raise ConfigError(f"{path}: {e}") from None
        raise


def _same_error(cls: type, tree: dict, error: ConfigError) -> bool:
    """Whether `tree` alone (a file, without the command line's overrides) fails as `error` says."""
    try:
        from_dict(cls, tree)
    except ConfigError as own:
        return str(own) == str(error)
    return False


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
    """Build dataclass `cls` from a nested dict: unknown keys are errors (a key in `cls.REMOVED_KEYS` is ignored with a
    warning); values are coerced and checked by `cls`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    removed = getattr(cls, "REMOVED_KEYS", {})
    hints = _hints(cls)
    kwargs = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in fields:
            if key in removed:
                log.warning("ignoring '%s': the key was removed (%s)", name, removed[key])
                continue
            raise ConfigError(f"unknown key '{name}'{_suggest(str(key), fields, prefix, hints)}")
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
        if bool in args and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return parse_bool(name, value)  # `resume=yes` is the bool, not the string, in `bool | str`
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
        for k, v in value.items():
            if v is None and ":" in str(k):  # {a:1}: YAML reads one key 'a:1' with no value
                a, _, b = str(k).partition(":")
                raise ConfigError(
                    f"{name}: got the key {k!r} with no value; YAML needs a space after ':': {{{a}: {b}}}"
                )
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


def _suggest(key: str, fields: dict, prefix: str, hints: dict | None = None) -> str:
    """The nearest key here when one is very close (`seed` for `seeds`); else a key of a section below named without
    its section (`lr` for `optim.lr`); else the nearest key here."""
    near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.85)
    if near:
        return f" (did you mean '{prefix}{near[0]}'?)"
    below = [
        f"{name}.{leaf.name}"
        for name, hint in (hints or {}).items()
        if dataclasses.is_dataclass(hint)
        for leaf in dataclasses.fields(hint)
        if leaf.init and leaf.name == key
    ]
    if below:
        return f" (did you mean '{prefix}{below[0]}'?)"
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


FAMILY_KEYS = ("lora.target_modules", "lora.modules_to_save")


def follow_model(path, overrides: list[str], default_model: str) -> list[str]:
    """`overrides`, plus `KEY=null` for each of the recipe's FAMILY_KEYS when `model.name` is overridden with another
    model (its LoRA module names were written for the recipe's model; the new one's family defaults apply)."""
    given = dict(parse_override(item) for item in overrides)
    if not path or "model.name" not in given:
        return overrides
    recipe = read_yaml(path)
    lora = recipe.get("lora") if isinstance(recipe.get("lora"), dict) else {}
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    if model.get("name", default_model) == given["model.name"]:
        return overrides
    from rbvl.config.resolve import TINY_MODELS, model_type

    was, now = model_type(str(model.get("name", default_model))), model_type(str(given["model.name"]))
    if was is not None and was == now:  # a model of the same family (tiny-llava for llava-1.5-7b): the same modules
        return overrides
    name = str(given["model.name"])
    if name.startswith("tiny-") and name not in TINY_MODELS and not Path(name).expanduser().exists():
        return overrides  # a mistyped tiny model: its check says so, with nothing about its family before it
    dropped = [key for key in FAMILY_KEYS if key not in given and lora.get(key.split(".")[1]) is not None]
    for key in dropped:
        log.warning(
            "model.name=%s: %s follows its family, not the recipe's %r (written for %s); set %s=... to keep one",
            given["model.name"], key, lora[key.split(".")[1]], model.get("name", default_model), key,
        )  # fmt: skip
    return overrides + [f"{key}=null" for key in dropped]
