"""Options declared once: a dataclass field carries its default, its help and its choices, and the
entry points' click options, the recipe's fields and the runs' params all come from it
(tests/test_options.py fails when `MLproject` drifts from them)."""

from __future__ import annotations

import dataclasses
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


def checked(opts):
    """`opts` with every choice checked: a library caller gets the same one-line error as the
    command line."""
    for f in cli_fields(type(opts)):
        choices = f.metadata.get("choices")
        if choices and getattr(opts, f.name) not in choices:
            raise SoupsError(
                f"{f.name}={getattr(opts, f.name)!r} must be one of {', '.join(map(str, choices))}"
            )
    return opts


def cli_name(f: dataclasses.Field) -> str:
    """The option's name on the command line and as a run param (`cli=` when the field's name
    cannot be it, e.g. `from`, a Python keyword)."""
    return f.metadata.get("cli", f.name)


def params(opts) -> dict[str, Any]:
    """An options object as run params: its command-line fields, by their declared names."""
    return {cli_name(f): getattr(opts, f.name) for f in cli_fields(type(opts))}
