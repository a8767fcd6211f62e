"""Model stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"): per
layer, move from the start weights towards the average of the fine-tunes by
t = N·cosθ / (1 + (N−1)·cosθ), θ the angle between the fine-tunes' deltas from the start.

Streams: the mean pairwise cosine of N deltas is (|Σ u_i|² − N) / (N(N−1)) for the unit deltas
u_i, so a running sum of unit deltas beside the running sum of weights is all it keeps."""

from __future__ import annotations

import torch

from soups import SoupsError
from soups.soup.core import RunningAverage, SoupResult, StateDict, Step, no_usable, usable
from soups.soup.registry import Kitchen, register


def interpolation_ratio(n: int, cos: float) -> float:
    """The paper's t for n fine-tunes whose deltas meet at mean cosine `cos`, kept in [0, 1]."""
    if n <= 1:
        return 1.0
    return min(max(n * cos / (1 + (n - 1) * cos), 0.0), 1.0) if cos > 0 else 0.0


class UnitDeltas:
    """Running sum, per tensor, of each fine-tune's delta from the start scaled to unit length."""

    def __init__(self, start: StateDict):
        self.start = start
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, state: StateDict) -> None:
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            if k not in self.start or self.start[k].shape != v.shape:
                raise SoupsError(f"start weights do not fit the ingredients: {k} missing or of another shape")
            delta = v.detach().double().flatten() - self.start[k].double().flatten()
            norm = delta.norm()
            if norm > 0:  # a tensor the fine-tune never moved has no direction
                self.sum[k] = self.sum.get(k, torch.zeros_like(delta)) + delta / norm
                self.count[k] = self.count.get(k, 0) + 1

    def mean_cos(self, k: str) -> float:
        n = self.count.get(k, 0)
        if n < 2:
            return 1.0
        return float((self.sum[k].dot(self.sum[k]) - n) / (n * (n - 1)))


@register(
    "model_stock",
    "per layer, interpolate from the start towards the average by the angle between fine-tunes",
    "Jang et al. 2024, Model Stock: https://arxiv.org/abs/2403.19522",
    needs_start=True,
)
def cook(kitchen: Kitchen) -> SoupResult:
    start = kitchen.start_weights("model_stock")
    soup, deltas, steps, names, best = RunningAverage(), UnitDeltas(start), [], [], 0
    for rank, name, state in usable(kitchen.candidates, soup, steps):
        if not soup.count:
            best = kitchen.scorer.correct(state)
        soup.add(state)
        deltas.add(state)
        names.append(name)
        steps.append(Step(rank, name, "kept", "model stock", None))
    if not soup.count:
        raise no_usable(steps)
    average, n = soup.average(), soup.count
    out, ratios = {}, []
    for k, avg in average.items():
        if not avg.is_floating_point():
            out[k] = avg
            continue
        t = interpolation_ratio(n, deltas.mean_cos(k))
        ratios.append(t)
        out[k] = (t * avg.double() + (1 - t) * start[k].double()).to(avg.dtype)
    correct = kitchen.scorer.correct(out) if n > 1 else best
    details = {"mean_ratio": sum(ratios) / max(len(ratios), 1)}
    return SoupResult(out, names, steps, best, correct, kitchen.scorer.size, n > 1, details=details)
