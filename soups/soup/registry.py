"""The soup-method registry: each method is one small file that declares its name, its parameters
with defaults, what it needs and the paper it implements, and registers one `cook` function
(mergekit's merge methods, timm's `@register_model`). The soup step, its command-line options,
its MLflow params and its plots are generated from these declarations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from soups import SoupsError
from soups.options import cli_fields, cli_name, filled
from soups.soup.core import Candidate, SoupResult, StateDict


class HeldOut(Protocol):
    """Scores state dicts on the held-out (val) set: `evaluate.Scorer` is the real one."""

    size: int

    def correct(self, state: StateDict, max_errors: int | None = None) -> int | None: ...

    def subset(self, idx: Any) -> HeldOut:
        """The same scorer on part of the held-out set (a method that ranks or fits on one part
        and chooses on another)."""
        ...


@dataclass
class Kitchen:
    """What a soup method cooks with: ranked candidates (best first, loaded lazily, one at a time),
    the held-out scorer, and the sweep's shared starting weights for the methods that need them."""

    candidates: Iterable[Candidate]
    scorer: HeldOut
    start: Callable[[], StateDict] | None = None

    def start_weights(self, method: str) -> StateDict:
        if self.start is None:
            raise SoupsError(f"method {method} needs the ingredients' starting weights, and none were given")
        return self.start()


@dataclass(frozen=True)
class SoupMethod:
    name: str
    cook: Callable[..., SoupResult]  # cook(kitchen, **params) -> SoupResult
    summary: str  # one line for --help
    paper: str  # what it implements, with a link
    options: type | None = None  # a dataclass of `soups.options.option` fields: the method's parameters
    needs_start: bool = False  # the shared starting weights (model stock, WiSE-FT)
    streams: bool = True  # O(1) state dicts in the number of candidates; False: holds them all
    curve_x: str = "candidates considered (rank by val accuracy)"  # x of the method's curve

    @property
    def params(self) -> list[dataclasses.Field]:
        return cli_fields(self.options) if self.options else []

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """This method's parameters as `cook` takes them: the given values (by their command-line
        names; coerced and checked), else the defaults."""
        if not self.options:
            return {}
        return dataclasses.asdict(filled(self.options, given, f"soup method {self.name}"))

    def __call__(self, kitchen: Kitchen, **params: Any) -> SoupResult:
        return self.cook(kitchen, **self.resolve(params))


METHODS: dict[str, SoupMethod] = {}


def register(name: str, summary: str, paper: str, **declared: Any) -> Callable:
    """Decorator: `@register("greedy", "...", "Wortsman et al. 2022 ...", options=GreedyOptions)`."""

    def add(cook: Callable[..., SoupResult]) -> Callable[..., SoupResult]:
        if name in METHODS:
            raise ValueError(f"soup method {name!r} registered twice")
        names = [cli_name(f) for f in all_params()]
        added = SoupMethod(name, cook, summary, paper, **declared)
        clash = [cli_name(f) for f in added.params if cli_name(f) in names]
        if clash:  # every parameter is also a command-line option: names are global
            raise ValueError(f"soup method {name!r}: parameter {clash[0]} is another method's")
        METHODS[name] = added
        return cook

    return add


def method(name: str) -> SoupMethod:
    if name not in METHODS:
        raise SoupsError(f"method={name!r} must be one of {', '.join(METHODS)}")
    return METHODS[name]


def all_params() -> list[dataclasses.Field]:
    return [p for m in METHODS.values() for p in m.params]
