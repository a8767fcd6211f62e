"""Uniform soup (Wortsman et al. 2022, "Model soups"): every usable ingredient with equal weight."""

from __future__ import annotations

from collections.abc import Iterable

from soups.soup.core import RunningAverage, SoupResult, StateDict, Step, no_usable, usable
from soups.soup.registry import Kitchen, register


def uniform_soup(states: Iterable[StateDict]) -> StateDict:
    avg = RunningAverage()
    for state in states:
        avg.add(state)
    return avg.average()


@register(
    "uniform",
    "average every usable ingredient with equal weight",
    "Wortsman et al. 2022, Model soups, uniform soup: https://arxiv.org/abs/2203.05482",
)
def cook(kitchen: Kitchen) -> SoupResult:
    soup, steps, names, best = RunningAverage(), [], [], 0
    for rank, name, state in usable(kitchen.candidates, soup, steps):
        if not soup.count:
            best = kitchen.scorer.correct(state, None, False)
        soup.add(state)
        names.append(name)
        steps.append(Step(rank, name, "kept", "uniform", None))
    if not soup.count:
        raise no_usable(steps)
    state = soup.average()
    correct = kitchen.scorer.correct(state, None, True) if soup.count > 1 else best
    return SoupResult(state, names, steps, best, correct, kitchen.scorer.size, soup.count > 1)
