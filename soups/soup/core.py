"""What every soup method shares: state dicts averaged in float64, ranked candidates loaded one
at a time, and the record of each step. No MLflow here.

Memory stays O(1) in the number of candidates for the methods that stream: ingredients arrive one
at a time through a lazy iterable; a soup is a running float64 sum, and a candidate soup is built
only to be scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from soups import SoupsError

StateDict = dict[str, torch.Tensor]
# score(state_dict, max_errors) -> correct predictions on the held-out set, or None as soon as the
# errors exceed max_errors (None: never stop early). Counts, not floats, decide. The scorer treats
# every state dict alike, single model or average (BatchNorm statistics recomputed for all or for
# none), so a gain is never the treatment's.
Score = Callable[[StateDict, int | None], int | None]


class Shapes:
    """The keys and shapes of a first state dict, and nothing else: what a later one must match
    to be averaged with it (a method that only checks compatibility holds no weights for it)."""

    def __init__(self, state: StateDict | None = None) -> None:
        self.shapes = {k: tuple(v.shape) for k, v in (state or {}).items()}

    def mismatch(self, state: StateDict) -> str | None:
        """Why `state` differs (the first key that does), or None; a first state always fits."""
        if not self.shapes:
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}
            return None
        missing = [k for k in self.shapes if k not in state]
        extra = [k for k in state if k not in self.shapes]
        if missing or extra:
            first = f"key {missing[0]} missing" if missing else f"unexpected key {extra[0]}"
            return f"{first} ({len(missing)} missing, {len(extra)} extra)"
        for k, v in state.items():
            if tuple(v.shape) != self.shapes[k]:
                return f"shape of {k} is {tuple(v.shape)}, soup has {self.shapes[k]}"
        return None


class RunningAverage:
    """Sum of state dicts in float64; integer buffers (e.g. num_batches_tracked) are copied from
    the first ingredient, never averaged."""

    def __init__(self) -> None:
        self.sum: StateDict = {}
        self.count = 0
        self._dtypes: dict[str, torch.dtype] = {}

    def mismatch(self, state: StateDict) -> str | None:
        """Why `state` cannot join this average (the first key that differs), or None."""
        return Shapes(self.sum).mismatch(state) if self.count else None

    def add(self, state: StateDict) -> None:
        if reason := self.mismatch(state):
            raise SoupsError(f"cannot average: {reason}")
        for k, v in state.items():
            if not self.count:
                self._dtypes[k] = v.dtype
                self.sum[k] = v.detach().to(torch.float64, copy=True) if v.is_floating_point() else v.clone()
            elif v.is_floating_point():
                self.sum[k] += v.detach().to(torch.float64)
        self.count += 1

    def average(self, plus: StateDict | None = None) -> StateDict:
        """The mean of what was added (and of `plus`, without adding it), in the original dtypes."""
        n = self.count + (plus is not None)
        if not n:
            raise SoupsError("cannot average zero state dicts")
        out = {}
        for k, total in self.sum.items():
            if total.is_floating_point():
                if plus is not None:
                    total = total + plus[k].detach().to(torch.float64)
                out[k] = (total / n).to(self._dtypes[k])
            else:
                out[k] = total.clone()
        return out


def uniform_soup(states: Iterable[StateDict]) -> StateDict:
    avg = RunningAverage()
    for state in states:
        avg.add(state)
    return avg.average()


@dataclass
class Candidate:
    """One ingredient in rank order; `load` reads its weights when its turn comes (and raises
    SoupsError with the reason when they are missing, broken or incompatible)."""

    name: str
    load: Callable[[], StateDict]


@dataclass
class Step:
    rank: int
    name: str
    status: str  # kept | not kept | skipped (unreadable or incompatible: never scored)
    reason: str
    soup_correct: int | None  # held-out correct count of the soup after this step

    @property
    def accepted(self) -> bool:
        return self.status == "kept"


@dataclass
class SoupResult:
    """What a soup method made. Counts are exact correct predictions on `held_out` images (for a
    method that ranks or fits on part of the held-out set, only the part it did not use for that)."""

    state_dict: StateDict
    ingredients: list[str]  # the candidates that went in, best first
    steps: list[Step]  # one per candidate considered, in rank order
    best_correct: int  # the best usable ingredient alone
    correct: int  # the soup
    held_out: int
    averaged: bool  # the weights mix several models: BatchNorm statistics need recomputing
    curve: list[tuple[int, int]] = field(default_factory=list)  # (x, correct): the method's own curve
    details: dict[str, float] = field(default_factory=dict)  # method-specific numbers worth logging
    scored_on: torch.Tensor | None = None  # indices of the held-out images it was scored on (None: all)

    @property
    def accuracy(self) -> float:
        return self.correct / self.held_out

    @property
    def best_accuracy(self) -> float:
        return self.best_correct / self.held_out

    @property
    def val_gain(self) -> float:
        """Over the best ingredient, on the same images with the same treatment."""
        return self.accuracy - self.best_accuracy


def usable(candidates: Iterable[Candidate], soup: RunningAverage, steps: list[Step]):
    """(rank, name, state) of each candidate that loads and fits `soup`, lazily, one at a time;
    the others are recorded in `steps` as skipped, with the reason."""
    for rank, cand in enumerate(candidates, start=1):
        try:
            state = cand.load()
        except SoupsError as e:
            steps.append(Step(rank, cand.name, "skipped", str(e), None))
            continue
        if reason := soup.mismatch(state):
            steps.append(Step(rank, cand.name, "skipped", f"incompatible: {reason}", None))
            continue
        yield rank, cand.name, state


def no_usable(steps: list[Step]) -> SoupsError:
    return SoupsError("no usable ingredient: " + "; ".join(f"{s.name}: {s.reason}" for s in steps[:3]))
