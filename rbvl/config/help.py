"""Help text read off a dataclass: its fields' attribute docstrings, as `--help-config` rows and as `--flags`.

Each field is documented once, where it is defined, by the string literal right after it (litgpt's convention):
`describe` turns a config class into (key, allowed, default, doc) rows (`rbvl train --help-config`) and `add_flags`
into one argparse flag per field (`rbvl-regroup --help`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from rbvl.config.engine import _hints, _scalar, _show, _strip_none, allowed_text


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, what it allows, default, doc) for every field, read from the attribute docstrings of `cls`."""
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
