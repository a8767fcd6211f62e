"""Is a soup better than its best ingredient, or lucky on this test set? Both are scored on the same
images, so the question is about their paired difference: a bootstrap over images gives the
interval of the gain, an exact McNemar test on the images where they disagree gives the p-value.
No MLflow here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binomtest  # scipy arrives with albumentations and mlflow

from soups import SoupsError


@dataclass(frozen=True)
class Gain:
    """Accuracy of model a minus that of model b on the same `n` images (fractions, not points),
    with its interval; `only_a` images only a gets right, `only_b` only b."""

    gain: float
    low: float
    high: float
    p_value: float
    n: int
    only_a: int
    only_b: int
    confidence: float = 0.95

    @property
    def distinguishable(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        verdict = "distinguishable" if self.distinguishable else "not distinguishable"
        return (
            f"{100 * self.gain:+.2f} points ({100 * self.confidence:g}% CI {100 * self.low:+.2f} to "
            f"{100 * self.high:+.2f}; {self.only_a} vs {self.only_b} images it alone gets right; "
            f"p = {self.p_value:.2g}): {verdict} from zero"
        )


def as_bools(correct: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    correct = np.asarray(correct)
    if correct.ndim != 1:
        raise SoupsError(f"{name} must be one flag per image (1-D), got shape {correct.shape}")
    return correct.astype(bool)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: under 'equally good', each image that exactly one model gets
    right is a fair coin flip between them."""
    if not only_a + only_b:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_gain(
    correct_a: np.ndarray | torch.Tensor,
    correct_b: np.ndarray | torch.Tensor,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Gain:
    """Accuracy of a minus accuracy of b, from per-image correctness of both on the same images,
    with a paired percentile-bootstrap interval (seeded: the same inputs give the same interval)."""
    a, b = as_bools(correct_a, "correct_a"), as_bools(correct_b, "correct_b")
    if len(a) != len(b):
        raise SoupsError(
            f"correct_a has {len(a)} images, correct_b has {len(b)}: score both models on the same images"
        )
    if not len(a):
        raise SoupsError("no images to compare: the correctness vectors are empty")
    if resamples < 1 or not 0 < confidence < 1:
        raise SoupsError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    n, only_a, only_b = len(a), int((a & ~b).sum()), int((~a & b).sum())
    # A resample's gain depends only on how many drawn images are a-only and b-only, so drawing the
    # counts from a multinomial is the index bootstrap in distribution, in O(resamples), not O(n x
    # resamples) (10,000 images x 2,000 resamples: ~2 ms instead of ~0.2 s).
    probs = [only_a / n, only_b / n, 1 - (only_a + only_b) / n]
    counts = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    gains = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(gains, [(1 - confidence) / 2, (1 + confidence) / 2])
    p_value = mcnemar_p(only_a, only_b)
    return Gain((only_a - only_b) / n, float(low), float(high), p_value, n, only_a, only_b, confidence)
