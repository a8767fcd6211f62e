"""Greedy soup (Wortsman et al. 2022, "Model soups", Recipe 1): start from the best ingredient and
add each next one, in rank order, when the soup scores at least as well on the held-out set."""

from __future__ import annotations

from collections.abc import Iterable

from soups import SoupsError
from soups.soup.core import Candidate, RunningAverage, Score, SoupResult, Step, no_usable, usable
from soups.soup.registry import Kitchen, Param, register

TIE_RULES = {
    "ge": "keep an ingredient when the soup's score is not worse (the paper's rule)",
    "strict": "keep an ingredient only when the soup's score improves",
}


def greedy_soup(candidates: Iterable[Candidate], score: Score, held_out: int, tie: str = "ge") -> SoupResult:
    """The paper's recipe: start from the best ingredient; add each next one when the averaged
    soup scores at least as well on the held-out set (`tie="strict"`: better). A candidate soup is
    abandoned as soon as its errors make acceptance impossible; picks equal a full evaluation."""
    if tie not in TIE_RULES:
        raise SoupsError(f"tie={tie!r} must be one of {', '.join(TIE_RULES)}")
    soup = RunningAverage()
    steps: list[Step] = []
    names: list[str] = []
    best = current = 0
    for rank, name, state in usable(candidates, soup, steps):
        if not soup.count:  # the best usable ingredient starts the soup
            soup.add(state)
            best = current = score(state, None)
            names.append(name)
            steps.append(Step(rank, name, "kept", "best ingredient", current))
            continue
        allowed = held_out - current - (tie == "strict")  # errors the candidate soup may make
        correct = score(soup.average(plus=state), allowed)
        if correct is not None and (correct > current or (tie == "ge" and correct == current)):
            soup.add(state)
            names.append(name)
            reason = "soup improved" if correct > current else "soup no worse (a tie)"
            current = correct
            steps.append(Step(rank, name, "kept", reason, current))
        else:
            got = "stopped early" if correct is None else f"{correct} correct"
            steps.append(Step(rank, name, "not kept", f"{got}, soup has {current}", current))
        del state
    if not soup.count:
        raise no_usable(steps)
    curve = [(s.rank, s.soup_correct) for s in steps if s.soup_correct is not None]
    return SoupResult(soup.average(), names, steps, best, current, held_out, soup.count > 1, curve)


@register(
    "greedy",
    "add ingredients in rank order while the soup's val accuracy does not drop",
    "Wortsman et al. 2022, Model soups, greedy soup: https://arxiv.org/abs/2203.05482",
    params=(Param("tie", "ge", "; ".join(f"{k}: {v}" for k, v in TIE_RULES.items()), tuple(TIE_RULES)),),
)
def cook(kitchen: Kitchen, tie: str) -> SoupResult:
    return greedy_soup(kitchen.candidates, kitchen.scorer.correct, kitchen.scorer.size, tie)
