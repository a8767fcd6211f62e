"""Options declared once: a dataclass field carries its default, its help and its choices, and the
entry points' click options, the recipe's fields, the soup methods' parameters and the runs' params
all come from it. tests/test_options.py fails when `MLproject`, a command or a method drifts from
what is declared here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from soups import SoupsError


def option(default: Any, help: str, choices: tuple | list | None = None, **kw: Any) -> Any:
    """A field that is also a command-line option (`--name`, `-P name=...`) and a run param."""
    return field(
        default=default, metadata={"help": help, **({"choices": tuple(choices)} if choices else {}), **kw}
    )


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of an options class that the command line sets (those with help)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` (a YAML value, a `-P` string, a drawn number) as field `f`'s type, checked against
    its choices, or one line naming the option and `where` it came from."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else dict
    try:
        out = _as(kind, value)
    except (TypeError, ValueError):
        raise SoupsError(f"{where}: {cli_name(f)}={value!r} is not a valid {kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise SoupsError(f"{where}: {cli_name(f)}={out!r} must be one of {', '.join(map(str, choices))}")
    return out


def _as(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(value)
        return out
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(value)
        return value
    return str(value)


def filled(cls, given: dict[str, Any], where: str):
    """An options object of `cls`: the given values (None: not given) coerced and checked, the
    declared defaults for the rest."""
    return cls(
        **{
            f.name: coerce(f, given[cli_name(f)], where)
            for f in cli_fields(cls)
            if given.get(cli_name(f)) is not None
        }
    )


def checked(opts):
    """`opts` with every choice checked: a library caller gets the same one-line error as the
    command line."""
    for f in cli_fields(type(opts)):
        choices = f.metadata.get("choices")
        if choices and getattr(opts, f.name) not in choices:
            raise SoupsError(
                f"{cli_name(f)}={getattr(opts, f.name)!r} must be one of {', '.join(map(str, choices))}"
            )
    return opts


def cli_name(f: dataclasses.Field) -> str:
    """The option's name on the command line and as a run param (`cli=` when the field's name
    cannot be it, e.g. `from`, a Python keyword)."""
    return f.metadata.get("cli", f.name)


def params(opts) -> dict[str, Any]:
    """An options object as run params: its command-line fields, by their declared names."""
    return {cli_name(f): getattr(opts, f.name) for f in cli_fields(type(opts))}
