"""The soup rules (greedy, prefix, split, uniform) on scores given by table: which ingredients each
keeps, its tie rules and early rejection, and that none scores below its best ingredient."""

import itertools

import pytest
import torch

from soups import SoupsError
from soups.soup import METHODS, Candidate, Kitchen, RunningAverage, greedy_soup, uniform_soup
from soups.soup.greedy import prefix_soup

N = 6


def onehot(i: int) -> dict:
    """Ingredient i: a tensor whose mean over a soup reveals which ingredients are in it."""
    w = torch.zeros(N)
    w[i] = 1.0
    return {"w": w, "steps": torch.tensor(10 + i)}


def members(state) -> frozenset:
    return frozenset(int(j) for j in torch.nonzero(state["w"]).flatten())


def fake_score(table, held_out=100):
    """Correct count of each set of ingredients from `table` (default 0), honouring max_errors."""
    calls = []

    def score(state, max_errors=None):
        correct = table.get(members(state), 0)
        calls.append((members(state), max_errors))
        if max_errors is not None and held_out - correct > max_errors:
            return None
        return correct

    return score, calls


def cands(order):
    return [Candidate(f"run{i}", lambda i=i: onehot(i)) for i in order]


def test_running_average_equals_the_naive_mean_and_copies_integer_buffers():
    torch.manual_seed(0)
    states = [{"a": torch.randn(4, 3), "h": torch.randn(2).half(), "n": torch.tensor(k)} for k in range(5)]
    avg = uniform_soup(states)
    assert torch.allclose(avg["a"], torch.stack([s["a"] for s in states]).mean(0), atol=1e-6)
    assert avg["h"].dtype == torch.float16
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 0, "integer buffer copied from the first"
    r = RunningAverage()
    r.add(states[0])
    assert torch.allclose(r.average(plus=states[1])["a"], (states[0]["a"] + states[1]["a"]) / 2)
    assert r.count == 1, "average(plus=...) does not add"


def test_float64_sum_is_exact_where_float32_drifts():
    """1e8 then 999 ones: a float32 running sum never moves from 1e8 (its spacing there is 8)."""
    states = [{"a": torch.tensor([1e8])}] + [{"a": torch.tensor([1.0])} for _ in range(999)]
    naive = sum(s["a"] for s in states) / len(states)  # what a float32 accumulator gives
    assert float(naive) == pytest.approx(100_000.0, abs=0.01)
    averaged = uniform_soup(states)["a"]
    assert averaged.dtype == torch.float32 and float(averaged) == pytest.approx(100_000.999, abs=0.01)


def test_mismatching_state_dicts_are_named():
    r = RunningAverage()
    r.add({"a": torch.zeros(2), "b": torch.zeros(3)})
    assert "key b missing" in r.mismatch({"a": torch.zeros(2)})
    assert "shape of b is (4,)" in r.mismatch({"a": torch.zeros(2), "b": torch.zeros(4)})
    with pytest.raises(SoupsError, match="shape of b"):
        r.add({"a": torch.zeros(2), "b": torch.zeros(4)})


def test_greedy_follows_the_papers_recipe():
    table = {
        frozenset({0}): 80,
        frozenset({0, 1}): 82,  # improves: kept
        frozenset({0, 1, 2}): 81,  # worse: dropped
        frozenset({0, 1, 3}): 82,  # equal: kept under >=
        frozenset({0, 1, 3, 4}): 90,
    }
    score, _ = fake_score(table)
    result = greedy_soup(cands(range(5)), score, held_out=100)
    assert result.ingredients == ["run0", "run1", "run3", "run4"]
    assert result.correct == 90 and result.best_correct == 80
    assert members(result.state_dict) == {0, 1, 3, 4}
    assert [s.accepted for s in result.steps] == [True, True, False, True, True]


def test_strict_tie_rule_drops_equal_scores():
    table = {frozenset({0}): 80, frozenset({0, 1}): 80, frozenset({0, 2}): 81}
    score, _ = fake_score(table)
    assert greedy_soup(cands(range(3)), score, 100, tie="strict").ingredients == ["run0", "run2"]
    score, _ = fake_score(table)
    assert greedy_soup(cands(range(3)), score, 100, tie="ge").ingredients == ["run0", "run1"]
    with pytest.raises(SoupsError, match="tie='gt'"):
        greedy_soup(cands(range(3)), score, 100, tie="gt")


def test_early_rejection_bound_follows_the_tie_rule():
    score, calls = fake_score({frozenset({0}): 70})
    greedy_soup(cands(range(2)), score, 100, tie="ge")
    assert calls[1] == (frozenset({0, 1}), 30), "may make as many errors as the soup, not more"
    score, calls = fake_score({frozenset({0}): 70})
    greedy_soup(cands(range(2)), score, 100, tie="strict")
    assert calls[1] == (frozenset({0, 1}), 29)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_never_scores_below_its_best_ingredient(seed):
    g = torch.Generator().manual_seed(seed)
    subsets = [frozenset(c) for k in range(1, N + 1) for c in itertools.combinations(range(N), k)]
    table = {s: int(torch.randint(0, 101, (1,), generator=g)) for s in subsets}
    score, _ = fake_score(table)
    result = greedy_soup(cands(range(N)), score, 100)
    assert result.correct >= result.best_correct == table[frozenset({0})]
    assert result.correct == table[members(result.state_dict)]


def test_prefix_rule_sees_past_a_pair_that_scores_below_the_best_member():
    """The myopia measured on the demo: the top two average below the best member, the top four
    above it. The paper's rule stops at one; the prefix rule keeps all four."""
    table = {
        frozenset({0}): 80,
        frozenset({0, 1}): 78,  # the pair dips: each-rule drops run1, and then every later pair
        frozenset({0, 2}): 79,
        frozenset({0, 3}): 79,
        frozenset({0, 1, 2}): 80,
        frozenset({0, 1, 2, 3}): 84,
        frozenset({0, 1, 2, 3, 4}): 84,  # a tie: the longer prefix
        frozenset({0, 1, 2, 3, 4, 5}): 83,
    }
    score, _ = fake_score(table)
    assert greedy_soup(cands(range(N)), score, 100).ingredients == ["run0"]
    score, calls = fake_score(table)
    result = prefix_soup(cands(range(N)), score, 100)
    assert result.ingredients == ["run0", "run1", "run2", "run3", "run4"]
    assert (
        members(result.state_dict) == {0, 1, 2, 3, 4} and result.correct == 84 and result.best_correct == 80
    )
    assert [s.status for s in result.steps] == ["kept"] * 5 + ["not kept"]
    assert result.steps[5].reason == "top-6 soup: stopped early; the best prefix has 84"  # 83 < 84
    # early rejection only rules out prefixes that cannot tie the best so far
    assert calls[1] == (frozenset({0, 1}), 20) and calls[4] == (frozenset({0, 1, 2, 3, 4}), 16)
    assert result.curve == [(1, 80), (3, 80), (4, 84), (5, 84)]  # prefixes 2 and 6 abandoned early


@pytest.mark.parametrize("seed", range(5))
def test_prefix_rule_keeps_the_best_prefix_and_never_scores_below_its_best_ingredient(seed):
    g = torch.Generator().manual_seed(seed)
    prefixes = [frozenset(range(k)) for k in range(1, N + 1)]
    table = {s: int(torch.randint(0, 101, (1,), generator=g)) for s in prefixes}
    score, _ = fake_score(table)
    result = prefix_soup(cands(range(N)), score, 100)
    best = max(table.values())
    longest = max(k for k in range(1, N + 1) if table[frozenset(range(k))] == best)
    assert result.correct == best >= result.best_correct == table[frozenset({0})]
    assert members(result.state_dict) == set(range(longest)) and len(result.ingredients) == longest


class ImageScorer:
    """Per-image correctness of each set of ingredients: a scorer with subsets, as Scorer has."""

    def __init__(self, right: dict, idx=None):
        self.right, self.idx = right, torch.arange(len(next(iter(right.values())))) if idx is None else idx
        self.size = len(self.idx)

    def subset(self, idx):
        return ImageScorer(self.right, self.idx[torch.as_tensor(idx)])

    def correct(self, state, max_errors=None):
        got = int(self.right[members(state)][self.idx].sum())
        return None if max_errors is not None and self.size - got > max_errors else got


def test_split_rule_ranks_on_one_half_and_chooses_on_the_other():
    """run1 looks best only on the images it was chosen on; ranked on half A and judged on half B,
    the soup of all three wins, and its scores are on B alone."""
    from soups.soup.greedy import SPLIT_SEED, split_prefix_soup

    n = 200
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    a, b = order[: n // 2], order[n // 2 :]

    def right(on_a, on_b):
        v = torch.zeros(n, dtype=torch.bool)
        v[a[:on_a]], v[b[:on_b]] = True, True
        return v

    table = {
        frozenset({0}): right(80, 70),
        frozenset({1}): right(85, 60),  # best on A: ranks first
        frozenset({2}): right(70, 70),
        frozenset({0, 1}): right(0, 65),
        frozenset({0, 1, 2}): right(0, 75),
    }
    result = split_prefix_soup(cands([0, 1, 2]), ImageScorer(table))
    assert result.ingredients == ["run1", "run0", "run2"] and members(result.state_dict) == {0, 1, 2}
    # the baseline stays the top-ranked run (what ships without a soup), on half B
    assert result.held_out == 100 and result.best_correct == 70 and result.correct == 75
    assert torch.equal(result.scored_on, b.sort().values)
    assert [s.rank for s in result.steps] == [1, 2, 3] and result.steps[1].reason.startswith(
        "rank 1 on half A"
    )
    assert result.curve == [(1, 60), (2, 65), (3, 75)], "x: the soup of the top k on half A"


def split_table(n: int, counts: dict) -> dict:
    """Per-image correctness where each set of ingredients gets `counts[set] = (on_a, on_b)` right
    on the halves of the split rule."""
    from soups.soup.greedy import SPLIT_SEED

    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    a, b = order[: n // 2], order[n // 2 :]
    table = {}
    for members_, (on_a, on_b) in counts.items():
        v = torch.zeros(n, dtype=torch.bool)
        v[a[:on_a]], v[b[:on_b]] = True, True
        table[members_] = v
    return table


def test_split_rule_ships_the_top_ranked_run_alone_when_no_prefix_reaches_it_on_half_b():
    """run0 ranks first by its logged val accuracy; on half A run1 looks best, and every prefix of
    the half-A order scores below run0 alone on half B: run0 ships alone, unaveraged."""
    from soups.soup.greedy import split_prefix_soup

    table = split_table(200, {frozenset({0}): (50, 80), frozenset({1}): (90, 60), frozenset({0, 1}): (0, 70)})
    result = split_prefix_soup(cands([0, 1]), ImageScorer(table))
    assert result.ingredients == ["run0"] and members(result.state_dict) == {0} and not result.averaged
    assert result.correct == result.best_correct == 80 and result.held_out == 100
    assert [s.status for s in result.steps] == ["kept", "not kept"]
    assert result.steps[0].reason.startswith("rank 2 on half A") and "ships alone" in result.steps[0].reason
    assert result.curve == [(1, 60), (2, 70)]


@pytest.mark.parametrize("seed", range(8))
def test_split_rule_never_chooses_below_its_baseline_on_half_b(seed):
    from soups.soup.greedy import split_prefix_soup

    g = torch.Generator().manual_seed(100 + seed)
    sets = [frozenset(c) for k in range(1, 5) for c in itertools.combinations(range(4), k)]
    table = split_table(200, {s: tuple(torch.randint(0, 101, (2,), generator=g).tolist()) for s in sets})
    result = split_prefix_soup(cands(range(4)), ImageScorer(table))
    assert result.best_correct == ImageScorer(table).subset(result.scored_on).correct(onehot(0))
    assert result.correct >= result.best_correct
    assert result.correct == ImageScorer(table).subset(result.scored_on).correct(result.state_dict)
    assert result.averaged == (len(result.ingredients) > 1)


def test_broken_and_incompatible_candidates_are_skipped_with_reasons():
    def broken():
        raise SoupsError("checkpoint sha256 mismatch")

    odd = Candidate("odd", lambda: {"w": torch.zeros(N + 1), "steps": torch.tensor(0)})
    score, _ = fake_score({frozenset({0}): 50, frozenset({0, 2}): 60})
    result = greedy_soup([Candidate("bad", broken), *cands([0]), odd, *cands([2])], score, 100)
    assert result.ingredients == ["run0", "run2"]
    reasons = {s.name: s.reason for s in result.steps}
    assert reasons["bad"] == "checkpoint sha256 mismatch" and "shape of w" in reasons["odd"]
    with pytest.raises(SoupsError, match="no usable ingredient: bad: checkpoint sha256"):
        greedy_soup([Candidate("bad", broken)], score, 100)


class FakeScorer:
    def __init__(self, score, size=100):
        self.correct, self.size = score, size


def test_uniform_method_averages_every_usable_candidate():
    score, _ = fake_score({frozenset({0}): 50, frozenset({0, 1, 2}): 40})
    result = METHODS["uniform"](Kitchen(cands(range(3)), FakeScorer(score)))
    assert members(result.state_dict) == {0, 1, 2} and result.correct == 40 and result.best_correct == 50


def test_a_curve_on_half_of_val_is_drawn_against_the_baseline_on_the_same_images():
    """The split rule's curve is on half B: the ingredients' own val and the uniform soup's (all of
    val) are not drawn beside it, the top-ranked run on half B is."""
    from soups.plots import soup_curve
    from soups.soup.greedy import split_prefix_soup

    table = split_table(200, {frozenset({0}): (50, 80), frozenset({1}): (90, 60), frozenset({0, 1}): (0, 70)})
    result = split_prefix_soup(cands([0, 1]), ImageScorer(table))
    labels = (
        soup_curve(result, "ingredients in the soup", [0.9, 0.8], 0.85).axes[0].get_legend_handles_labels()[1]
    )
    assert labels == ["soup", "top-ranked run, same images"]
    result.scored_on = None  # the same curve on all of val: ingredients and the uniform soup beside it
    labels = (
        soup_curve(result, "candidates considered", [0.9, 0.8], 0.85).axes[0].get_legend_handles_labels()[1]
    )
    assert labels == ["soup", "ingredient kept", "ingredient not kept / skipped", "uniform soup"]
