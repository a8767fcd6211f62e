"""Uniform and greedy soups over state dicts (Wortsman et al. 2022). No MLflow here.

Memory stays O(1) in the number of candidates: ingredients arrive one at a time through a
lazy iterable; a soup is a running float64 sum, and a candidate soup is built only to be scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from soups import SoupsError

StateDict = dict[str, torch.Tensor]
# score(state_dict, max_errors, averaged) -> correct predictions on the held-out set, or None as
# soon as the errors exceed max_errors (None: never stop early). Counts, not floats, decide.
# `averaged` says the weights are a mean of several models (BatchNorm statistics need recomputing).
Score = Callable[[StateDict, int | None, bool], int | None]
TIE_RULES = {
    "ge": "keep an ingredient when the soup's score is not worse (the paper's rule)",
    "strict": "keep an ingredient only when the soup's score improves",
}


class RunningAverage:
    """Sum of state dicts in float64; integer buffers (e.g. num_batches_tracked) are copied from
    the first ingredient, never averaged."""

    def __init__(self) -> None:
        self.sum: StateDict = {}
        self.count = 0
        self._dtypes: dict[str, torch.dtype] = {}

    def mismatch(self, state: StateDict) -> str | None:
        """Why `state` cannot join this average (the first key that differs), or None."""
        if not self.count:
            return None
        missing = [k for k in self.sum if k not in state]
        extra = [k for k in state if k not in self.sum]
        if missing or extra:
            first = f"key {missing[0]} missing" if missing else f"unexpected key {extra[0]}"
            return f"{first} ({len(missing)} missing, {len(extra)} extra)"
        for k, v in state.items():
            if v.shape != self.sum[k].shape:
                return f"shape of {k} is {tuple(v.shape)}, soup has {tuple(self.sum[k].shape)}"
        return None

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
    state_dict: StateDict
    ingredients: list[str]
    steps: list[Step]
    best_correct: int
    correct: int
    uniform: StateDict | None  # the mean of every usable candidate, for the baseline
    uniform_count: int


def _usable(candidates: Iterable[Candidate], soup: RunningAverage, steps: list[Step]):
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


def _no_usable(steps: list[Step]) -> SoupsError:
    return SoupsError("no usable ingredient: " + "; ".join(f"{s.name}: {s.reason}" for s in steps[:3]))


def greedy_soup(candidates: Iterable[Candidate], score: Score, held_out: int, tie: str = "ge") -> SoupResult:
    """The paper's recipe: start from the best ingredient; add each next one when the averaged
    soup scores at least as well on the held-out set (`tie="strict"`: better). A candidate soup is
    abandoned as soon as its errors make acceptance impossible; picks equal a full evaluation."""
    if tie not in TIE_RULES:
        raise SoupsError(f"tie={tie!r} must be one of {', '.join(TIE_RULES)}")
    soup, everything = RunningAverage(), RunningAverage()
    steps: list[Step] = []
    names: list[str] = []
    best = current = 0
    for rank, name, state in _usable(candidates, soup, steps):
        everything.add(state)
        if not soup.count:  # the best usable ingredient starts the soup
            soup.add(state)
            best = current = score(state, None, False)
            names.append(name)
            steps.append(Step(rank, name, "kept", "best ingredient", current))
            continue
        allowed = held_out - current - (tie == "strict")  # errors the candidate soup may make
        correct = score(soup.average(plus=state), allowed, True)
        if correct is not None and (correct > current or (tie == "ge" and correct == current)):
            soup.add(state)
            names.append(name)
            current = correct
            steps.append(
                Step(rank, name, "kept", "soup improved" if correct > best else "soup no worse", current)
            )
        else:
            got = "stopped early" if correct is None else f"{correct} correct"
            steps.append(Step(rank, name, "not kept", f"{got}, soup has {current}", current))
        del state
    if not soup.count:
        raise _no_usable(steps)
    uniform = everything.average() if everything.count > 1 else None
    return SoupResult(soup.average(), names, steps, best, current, uniform, everything.count)


def uniform_method(
    candidates: Iterable[Candidate], score: Score, held_out: int, tie: str = "ge"
) -> SoupResult:
    """Every usable candidate, averaged with equal weight; scored once at the end."""
    soup, steps, names, best = RunningAverage(), [], [], 0
    for rank, name, state in _usable(candidates, soup, steps):
        if not soup.count:
            best = score(state, None, False)
        soup.add(state)
        names.append(name)
        steps.append(Step(rank, name, "kept", "uniform", None))
    if not soup.count:
        raise _no_usable(steps)
    state = soup.average()
    correct = score(state, None, True) if soup.count > 1 else best
    return SoupResult(state, names, steps, best, correct, state, soup.count)


# A soup method is one function: (ranked candidates, score, held-out size, tie rule) -> SoupResult.
SOUP_METHODS = {"greedy": greedy_soup, "uniform": uniform_method}
