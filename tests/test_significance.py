import math

import numpy as np
import pytest
import torch

from soups import SoupsError
from soups.significance import Gain, paired_gain


def models(n: int, only_a: int, only_b: int, accuracy: float = 0.8, seed: int = 1):
    """Correctness of two models on n images: b is right on ~accuracy of them, a agrees with b
    except on `only_a` images only a gets right and `only_b` images only b gets right."""
    b = np.random.default_rng(seed).random(n) < accuracy
    wrong, right = np.flatnonzero(~b), np.flatnonzero(b)
    a = b.copy()
    a[wrong[:only_a]] = True
    a[right[:only_b]] = False
    return a, b


def test_identical_models_gain_nothing():
    a, _ = models(1000, 0, 0)
    gain = paired_gain(a, a)
    assert (gain.gain, gain.only_a, gain.only_b, gain.n) == (0.0, 0, 0, 1000)
    assert gain.low <= 0 <= gain.high
    assert gain.p_value == 1.0
    assert not gain.distinguishable


def test_right_on_100_more_of_10000_is_distinguishable():
    a, b = models(10_000, 100, 0)
    gain = paired_gain(a, b)
    assert gain.gain == pytest.approx(0.01)
    assert (gain.only_a, gain.only_b) == (100, 0)
    assert gain.distinguishable
    assert gain.p_value < 1e-10
    assert 0.005 < gain.low < gain.high < 0.015


def test_balanced_disagreement_is_not_distinguishable():
    a, b = models(10_000, 50, 50)
    gain = paired_gain(a, b)
    assert gain.gain == 0.0
    assert gain.p_value == pytest.approx(1.0)
    assert not gain.distinguishable


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (100, 0), (0, 100), (50, 50), (30, 10), (400, 350)])
def test_the_interval_contains_the_point_gain(only_a, only_b):
    gain = paired_gain(*models(5000, only_a, only_b))
    assert gain.low <= gain.gain <= gain.high


def test_a_worse_model_gets_a_negative_gain():
    gain = paired_gain(*models(10_000, 0, 100))
    assert gain.gain == pytest.approx(-0.01)
    assert gain.high < 0 and gain.distinguishable


def test_same_seed_same_interval():
    a, b = models(2000, 30, 20)
    assert paired_gain(a, b, seed=7) == paired_gain(a, b, seed=7)
    assert paired_gain(a, b, resamples=500, seed=3) == paired_gain(a, b, resamples=500, seed=3)


def test_torch_tensors_give_what_numpy_gives():
    a, b = models(2000, 30, 20)
    assert paired_gain(torch.from_numpy(a), torch.from_numpy(b)) == paired_gain(a, b)
    assert paired_gain(a.astype(np.int64), b.astype(np.int64)) == paired_gain(a, b)


def test_different_lengths_are_refused_naming_both():
    with pytest.raises(SoupsError, match=r"1000.*999"):
        paired_gain(np.ones(1000, bool), np.ones(999, bool))


@pytest.mark.parametrize(
    "a, b",
    [(np.array([], bool), np.array([], bool)), (np.ones((2, 3), bool), np.ones((2, 3), bool))],
    ids=["empty", "2-D"],
)
def test_empty_or_shapeless_inputs_are_refused(a, b):
    with pytest.raises(SoupsError):
        paired_gain(a, b)


@pytest.mark.parametrize("only_a, only_b", [(100, 0), (300, 200), (600, 550)])
def test_interval_width_matches_the_normal_approximation(only_a, only_b):
    n = 10_000
    gain = paired_gain(*models(n, only_a, only_b), resamples=4000)
    p01, p10 = only_a / n, only_b / n
    normal = 2 * 1.96 * math.sqrt(p01 + p10 - (p01 - p10) ** 2) / math.sqrt(n)
    assert gain.high - gain.low == pytest.approx(normal, rel=0.15)


def test_exact_mcnemar_p_values():
    # 10 vs 2: 2 * P(X <= 2) for X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert paired_gain(*models(1000, 10, 2)).p_value == pytest.approx(2 * 79 / 4096)
    assert paired_gain(*models(1000, 64, 0)).p_value == pytest.approx(2 * 0.5**64)
    # Thousands of discordant images: finite, and close to the normal approximation.
    gain = paired_gain(*models(20_000, 3000, 2900))
    z = (3000 - 2900) / math.sqrt(5900)
    assert gain.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.01)


def test_describe_reads_like_a_sentence():
    gain = Gain(0.0064, 0.0021, 0.0107, 0.003, 10_000, 64, 0)
    assert gain.describe() == (
        "+0.64 points (95% CI +0.21 to +1.07; 64 vs 0 images it alone gets right; p = 0.003): "
        "distinguishable from zero"
    )
    tied = Gain(-0.001, -0.004, 0.002, 0.5, 10_000, 20, 30)
    assert tied.describe().endswith(": not distinguishable from zero")
