"""Uniform soup (Wortsman et al. 2022, "Model soups"): every usable ingredient with equal weight."""

from __future__ import annotations

from soups.soup.core import RunningAverage, SoupResult, Step, no_usable, usable
from soups.soup.registry import Kitchen, register


def average_all(kitchen: Kitchen, note: str) -> tuple[RunningAverage, list[str], list[Step], int]:
    """Every usable ingredient summed once, in rank order (streamed: one state dict at a time),
    with the best one's held-out count; what the uniform soup and WiSE-FT start from."""
    soup, steps, names, best = RunningAverage(), [], [], 0
    for rank, name, state in usable(kitchen.candidates, soup, steps):
        if not soup.count:
            best = kitchen.scorer.correct(state)
        soup.add(state)
        names.append(name)
        steps.append(Step(rank, name, "kept", note, None))
    if not soup.count:
        raise no_usable(steps)
    return soup, names, steps, best


@register(
    "uniform",
    "average every usable ingredient with equal weight",
    "Wortsman et al. 2022, Model soups, uniform soup: https://arxiv.org/abs/2203.05482",
)
def cook(kitchen: Kitchen) -> SoupResult:
    soup, names, steps, best = average_all(kitchen, "uniform")
    state = soup.average()
    correct = kitchen.scorer.correct(state) if soup.count > 1 else best
    return SoupResult(state, names, steps, best, correct, kitchen.scorer.size, soup.count > 1)
