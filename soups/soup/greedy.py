"""Greedy soup (Wortsman et al. 2022, "Model soups", Recipe 1), with three acceptance rules:
`split`, the default (rank the ingredients on one half of val, keep the rank-order prefix whose
soup scores best on the other half, or the top-ranked run alone when none reaches it there);
`each`, the paper's (start from the best ingredient, add each next one in rank order when the soup
scores at least as well on the held-out set); and `prefix` (the best rank-order prefix, on all of val).

Why `split`: the best member's val accuracy is the best of N noisy scores on the same images, so
every soup compared with it there looks worse than it is; ranking on half A and choosing on half B
removes that bias, and the fallback never ships below the top-ranked run on half B. Measured on the
demo recipe over three split seeds (bench/soup_quality.py, bench/NOTES.md): one draw of members
gave `split` +0.56 points on test over the best member and `each` +0.08; another draw +0.19 and
+0.30. With 4 members the draw of members moves the gain about as much as the rules differ.
On independently trained members (no shared start) every rule loses to the best member:
averaging needs a shared start."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from soups import SoupsError
from soups.options import option
from soups.soup.core import (
    Candidate,
    RunningAverage,
    Score,
    Shapes,
    SoupResult,
    StateDict,
    Step,
    no_usable,
    usable,
)
from soups.soup.registry import HeldOut, Kitchen, register

ACCEPT_RULES = {
    "split": "rank the ingredients on one half of val and choose the best prefix on the other, or "
    "the top-ranked run alone when no prefix reaches it there (the best member's score is not "
    "inflated by having been chosen on the same images)",
    "each": "add each next ingredient when the soup with it scores no worse on all of val (the paper's rule)",
    "prefix": "score the soup of the top k for every k and keep the best (ties: the longer)",
}
SPLIT_SEED = 0
TIE_RULES = {
    "ge": "accept=each: keep an ingredient when the soup's score is not worse (the paper's rule)",
    "strict": "accept=each: keep an ingredient only when the soup's score improves",
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


def prefix_soup(candidates: Iterable[Candidate], score: Score, held_out: int) -> SoupResult:
    """The soup of the top k usable ingredients (rank order) for every k, keeping the k whose soup
    scores best on the held-out set; at a tie the longer prefix (more averaging, the paper's bias).
    A prefix is abandoned as soon as its errors rule out beating the best so far."""
    soup = RunningAverage()
    steps: list[Step] = []
    names: list[str] = []
    best = kept = 0
    chosen: StateDict = {}
    for rank, name, state in usable(candidates, soup, steps):
        soup.add(state)
        names.append(name)
        if soup.count == 1:
            best = kept = score(state, None)
            chosen = soup.average()
            steps.append(Step(rank, name, "kept", "best ingredient", kept))
            continue
        correct = score(soup.average(), held_out - kept)
        if correct is not None and correct >= kept:
            kept, chosen = correct, soup.average()
        steps.append(Step(rank, name, "prefix", "stopped early" if correct is None else "", correct))
        del state
    if not soup.count:
        raise no_usable(steps)
    k = max((j for j, s in enumerate(steps) if s.status != "skipped" and s.soup_correct == kept), default=0)
    for j, s in enumerate(steps):
        if s.status == "prefix":
            inside = j <= k
            s.status = "kept" if inside else "not kept"
            got = "stopped early" if s.soup_correct is None else f"{s.soup_correct} correct"
            s.reason = f"top-{len(names[: names.index(s.name) + 1])} soup: {got}; " + (
                f"the best prefix has {kept}" if not inside else f"in the best prefix ({kept})"
            )
    ingredients = [s.name for s in steps if s.status == "kept"]
    curve = [(s.rank, s.soup_correct) for s in steps if s.soup_correct is not None]
    return SoupResult(chosen, ingredients, steps, best, kept, held_out, len(ingredients) > 1, curve)


def split_prefix_soup(candidates: Iterable[Candidate], scorer: HeldOut) -> SoupResult:
    """`prefix_soup` with the ranking and the choice on disjoint halves of the held-out set: the
    runs' val accuracy picked the best member on all of val, so on those images it looks better
    than it is (the best of N noisy scores), and every soup compared with it there looks worse.
    Here the members are ranked on half A and the prefixes judged on half B only. The baseline is
    still the top-ranked run (what would ship without a soup), scored on half B, and it ships
    alone when no prefix reaches it there: the rule never chooses below its baseline. The steps
    keep the runs' own ranks; the curve is the soup of the top k on half A, for each k."""
    order = torch.randperm(scorer.size, generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = scorer.size // 2
    ranker, scored_on = scorer.subset(order[:half].sort().values), order[half:].sort().values
    chooser = scorer.subset(scored_on)
    shapes, skipped, ranked = Shapes(), [], []
    top: tuple[Candidate, StateDict, int] | None = None  # the top-ranked usable run, its half-B score
    for rank, cand in enumerate(candidates, start=1):
        try:
            state = cand.load()
        except SoupsError as e:
            skipped.append(Step(rank, cand.name, "skipped", str(e), None))
            continue
        if reason := shapes.mismatch(state):
            skipped.append(Step(rank, cand.name, "skipped", f"incompatible: {reason}", None))
            continue
        if top is None:
            top = (cand, state, chooser.correct(state))
        ranked.append((-ranker.correct(state), rank, cand))
        del state
    if top is None:
        raise no_usable(skipped)
    result = prefix_soup(
        [c for _, _, c in sorted(ranked, key=lambda r: r[:2])], chooser.correct, chooser.size
    )
    own_rank = {c.name: rank for _, rank, c in ranked}
    result.curve = [
        (k, s.soup_correct) for k, s in enumerate(result.steps, start=1) if s.soup_correct is not None
    ]
    for step in result.steps:
        step.reason = f"rank {step.rank} on half A; {step.reason}"
        step.rank = own_rank[step.name]
    if result.correct < top[2]:  # no prefix reaches the top-ranked run on half B: it ships alone
        for step in result.steps:
            alone = step.name == top[0].name
            step.status = "kept" if alone else "not kept"
            step.reason = (
                f"{step.reason}; the top-ranked run alone scores {top[2]} on half B, the best prefix "
                f"{result.correct}: it ships alone"
            )
        result.state_dict, result.ingredients = top[1], [top[0].name]
        result.correct, result.averaged = top[2], False
    result.steps = sorted(skipped + result.steps, key=lambda s: s.rank)
    result.best_correct, result.scored_on = top[2], scored_on
    return result


@dataclass(frozen=True)
class GreedyOptions:
    accept: str = option("split", "; ".join(f"{k}: {v}" for k, v in ACCEPT_RULES.items()), ACCEPT_RULES)
    tie: str = option("ge", "; ".join(f"{k}: {v}" for k, v in TIE_RULES.items()), TIE_RULES)


@register(
    "greedy",
    "the best rank-order prefix of the ingredients, ranked on half of val and chosen on the other "
    "(accept=split; each: the paper's rule, add each next one while val accuracy does not drop)",
    "Wortsman et al. 2022, Model soups, greedy soup: https://arxiv.org/abs/2203.05482",
    options=GreedyOptions,
    curve_x="ingredients in the soup (accept=split: the top k on half A; each: candidates considered)",
)
def cook(kitchen: Kitchen, accept: str, tie: str) -> SoupResult:
    if accept == "prefix":
        return prefix_soup(kitchen.candidates, kitchen.scorer.correct, kitchen.scorer.size)
    if accept == "split":
        return split_prefix_soup(kitchen.candidates, kitchen.scorer)
    return greedy_soup(kitchen.candidates, kitchen.scorer.correct, kitchen.scorer.size, tie)
