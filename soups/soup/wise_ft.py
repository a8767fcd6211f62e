"""WiSE-FT-style interpolation (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):
θ(α) = α · uniform soup + (1 − α) · start weights, α picked on the held-out set by exact counts
(ties go to the larger α: closer to the fine-tunes)."""

from __future__ import annotations

from dataclasses import dataclass

from soups.options import option
from soups.soup.core import SoupResult, StateDict
from soups.soup.registry import Kitchen, register
from soups.soup.uniform import average_all


def interpolate(soup: StateDict, start: StateDict, alpha: float) -> StateDict:
    return {
        k: (alpha * v.double() + (1 - alpha) * start[k].double()).to(v.dtype) if v.is_floating_point() else v
        for k, v in soup.items()
    }


@dataclass(frozen=True)
class WiseOptions:
    wise_steps: int = option(10, "WiSE-FT: try alpha = 0, 1/steps, ..., 1 (1 is the uniform soup).")


@register(
    "wise_ft",
    "interpolate between the start weights and the uniform soup, the mix picked on val",
    "Wortsman et al. 2022, Robust fine-tuning of zero-shot models (WiSE-FT): https://arxiv.org/abs/2109.01903",
    options=WiseOptions,
    needs_start=True,
    curve_x="alpha × 100 (0: the start weights, 100: the uniform soup)",
)
def cook(kitchen: Kitchen, wise_steps: int) -> SoupResult:
    start = kitchen.start_weights("wise_ft")
    soup, names, steps, best = average_all(kitchen, "in the uniform soup")
    average, size = soup.average(), kitchen.scorer.size
    chosen, chosen_correct, curve = None, -1, []
    for j in range(max(1, wise_steps), -1, -1):  # from the soup towards the start
        alpha = j / max(1, wise_steps)
        mixed = interpolate(average, start, alpha)
        # A candidate must beat the best so far strictly: stop scoring once it cannot.
        correct = kitchen.scorer.correct(mixed, size - chosen_correct - 1 if chosen is not None else None)
        if correct is not None:
            curve.append((round(100 * alpha), correct))
            if correct > chosen_correct:
                chosen, chosen_correct, chosen_alpha = mixed, correct, alpha
    curve.sort()
    return SoupResult(
        chosen, names, steps, best, chosen_correct, size, True, curve, details={"alpha": chosen_alpha}
    )
