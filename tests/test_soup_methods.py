"""Every registered soup method on tiny timm models (the contract), then each method's own rule."""

import gc
import itertools

import pytest
import torch

from soups import SoupsError
from soups.data import decode, make_splits, model_input
from soups.evaluate import EvalSet, Scorer
from soups.layouts import read_layout
from soups.models import create_model, normalisation
from soups.soup import METHODS, Candidate, Kitchen
from soups.soup.learned import load_all
from soups.soup.model_stock import UnitDeltas, interpolation_ratio
from soups.soup.wise_ft import interpolate
from tests.conftest import make_imagefolder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A shared start (a tiny BatchNorm model trained a little) and five fine-tunes of it that
    differ in seed and learning rate, as a sweep's members would."""
    root = make_imagefolder(tmp_path_factory.mktemp("methods"), per_class=20)
    splits = make_splits(read_layout("imagefolder", root), 0.3, 0.0, 0)
    model = create_model("test_efficientnet", 3)
    mean, std = normalisation(model)
    train = EvalSet.from_decoded(decode(splits.train, 24), 3)
    val = EvalSet.from_decoded(decode(splits.val, 24), 3)

    def fit(state, steps, lr, seed):
        model.load_state_dict(state)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):  # full batches: see test_soup.trained
            order = torch.randperm(len(train))
            x, y = train.images[order], train.labels[order]
            loss = torch.nn.functional.cross_entropy(model(model_input(x, mean, std)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    start = fit(create_model("test_efficientnet", 3).state_dict(), 30, 1e-2, 0)
    members = [fit(start, 10, lr, seed) for seed, lr in enumerate([3e-3, 1e-3, 5e-3, 2e-3, 4e-3])]
    return dict(start=start, members=members, val=val, train=train, mean=mean, std=std)


def scorer_of(sweep, bn=True):
    return Scorer(
        create_model("test_efficientnet", 3),
        sweep["val"],
        sweep["mean"],
        sweep["std"],
        batch_size=16,
        bn_images=sweep["train"] if bn else None,
    )


def cands(states, broken_at=None):
    out = [Candidate(f"m{i}", lambda s=s: {k: v.clone() for k, v in s.items()}) for i, s in enumerate(states)]
    if broken_at is not None:

        def broken():
            raise SoupsError("checkpoint of run bad cannot be downloaded")

        out.insert(broken_at, Candidate("bad", broken))
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_makes_a_loadable_soup_whose_count_is_honest(sweep, name):
    scorer = scorer_of(sweep)
    kitchen = Kitchen(cands(sweep["members"], broken_at=2), scorer, lambda: sweep["start"])
    result = METHODS[name](kitchen)
    create_model("test_efficientnet", 3).load_state_dict(result.state_dict)  # strict: every key
    assert result.ingredients and set(result.ingredients) <= {f"m{i}" for i in range(5)}
    assert [s.rank for s in result.steps] == list(range(1, 7)), "every candidate has a row, in rank order"
    bad = next(s for s in result.steps if s.name == "bad")
    assert bad.status == "skipped" and "cannot be downloaded" in bad.reason
    assert result.averaged == (len(result.ingredients) > 1) or name == "wise_ft"
    # The count it reports is what the soup scores on the images it was scored on.
    held = scorer if result.held_out == scorer.size else None
    if held is not None:
        assert held.correct(result.state_dict) == result.correct
        assert held.correct(sweep["members"][0]) == result.best_correct
    else:  # learned, greedy's split rule: scored on the part of val they did not fit or rank on
        assert name in ("learned", "greedy") and result.held_out == len(result.scored_on) < scorer.size
        held = scorer.subset(result.scored_on)
        assert held.correct(result.state_dict) == result.correct
        assert held.correct(sweep["members"][0]) == result.best_correct


@pytest.mark.parametrize("name", [m.name for m in METHODS.values() if m.needs_start])
def test_a_method_that_needs_the_start_says_so(sweep, name):
    with pytest.raises(SoupsError, match=f"method {name} needs the ingredients' starting weights"):
        METHODS[name](Kitchen(cands(sweep["members"]), scorer_of(sweep)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in METHODS.values() if m.streams])
def test_streaming_methods_hold_a_flat_number_of_tensors(sweep, name, monkeypatch):
    """Tensors alive while each soup is scored: no more with 12 candidates than with 3 (counted
    in every scorer, the subsets a method ranks or chooses on included)."""
    peaks = {}
    base = sweep["members"][0]
    real = Scorer.correct

    def counting(self, state, max_errors=None):
        nonlocal peak
        gc.collect()
        peak = max(peak, sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
        return real(self, state, max_errors)

    monkeypatch.setattr(Scorer, "correct", counting)
    for n in (3, 12):
        scorer, peak = scorer_of(sweep, bn=False), 0
        stream = (
            Candidate(
                f"m{i}",
                lambda i=i: {k: v + 1e-4 * i if v.is_floating_point() else v for k, v in base.items()},
            )
            for i in range(n)
        )
        METHODS[name](Kitchen(stream, scorer, lambda: sweep["start"]))
        peaks[n] = peak
    assert peaks[12] <= peaks[3] + 5, peaks


def test_no_usable_ingredient_is_one_error_naming_them(sweep):
    def broken():
        raise SoupsError("sha256 mismatch")

    for name in METHODS:
        with pytest.raises(SoupsError, match="no usable ingredient: bad: sha256 mismatch"):
            METHODS[name](Kitchen([Candidate("bad", broken)], scorer_of(sweep), lambda: sweep["start"]))


# --- model stock ----------------------------------------------------------------------------------


def test_model_stock_ratio_follows_the_paper():
    assert interpolation_ratio(2, 1.0) == 1.0, "identical directions: the average itself"
    assert interpolation_ratio(2, 0.5) == pytest.approx(2 * 0.5 / 1.5)
    assert interpolation_ratio(5, 0.2) == pytest.approx(5 * 0.2 / (1 + 4 * 0.2))
    assert interpolation_ratio(4, 0.0) == 0.0 and interpolation_ratio(4, -0.3) == 0.0, "orthogonal: the start"
    assert interpolation_ratio(1, 0.3) == 1.0


def test_streamed_mean_cosine_equals_the_pairwise_mean():
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(50, generator=g)}
    states = [{"w": start["w"] + torch.randn(50, generator=g) + 0.5} for _ in range(4)]
    deltas = UnitDeltas(start)
    for s in states:
        deltas.add(s)
    d = [s["w"] - start["w"] for s in states]
    pairwise = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(d, 2)]
    assert deltas.mean_cos("w") == pytest.approx(float(sum(pairwise) / len(pairwise)), rel=1e-5)


def test_model_stock_lands_between_start_and_average(sweep):
    members, start = sweep["members"][:3], sweep["start"]
    result = METHODS["model_stock"](Kitchen(cands(members), scorer_of(sweep), lambda: start))
    key = "conv_stem.weight"
    average = sum(m[key] for m in members) / 3
    t = result.details["mean_ratio"]
    assert 0 < t < 1
    # per tensor: soup = t_k * average + (1 - t_k) * start, with the same t_k for every element
    d_soup, d_avg = (result.state_dict[key] - start[key]).flatten(), (average - start[key]).flatten()
    ratio = d_soup[d_avg.abs() > 1e-6] / d_avg[d_avg.abs() > 1e-6]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-3) and 0 < float(ratio[0]) < 1


# --- WiSE-FT --------------------------------------------------------------------------------------


class Alphas:
    """A fake scorer that reads alpha back from a one-number state: correct = table[alpha]."""

    def __init__(self, table, size=100):
        self.table, self.size, self.calls = table, size, []

    def correct(self, state, max_errors=None):
        alpha = round(float(state["w"]), 2)
        self.calls.append((alpha, max_errors))
        correct = self.table.get(alpha, 50)
        return None if max_errors is not None and self.size - correct > max_errors else correct


def test_wise_ft_picks_the_best_mix_on_val_and_ties_go_to_the_soup():
    start = {"w": torch.tensor(0.0)}
    members = [{"w": torch.tensor(1.0)}, {"w": torch.tensor(1.0)}]
    scorer = Alphas({1.0: 70, 0.9: 70, 0.6: 80, 0.5: 80, 0.0: 40}, size=100)
    result = METHODS["wise_ft"](Kitchen(cands(members), scorer, lambda: start))
    assert result.details["alpha"] == 0.6 and result.correct == 80, "the larger of two tied best mixes"
    assert float(result.state_dict["w"]) == pytest.approx(0.6)
    assert interpolate({"w": torch.tensor(2.0)}, {"w": torch.tensor(0.0)}, 0.25)["w"] == 0.5


# --- learned --------------------------------------------------------------------------------------


def test_learned_soup_is_scored_only_on_images_it_did_not_fit(sweep, monkeypatch):
    seen = []
    real_subset = Scorer.subset

    def subset(self, idx):
        seen.append(set(torch.as_tensor(idx).tolist()))
        return real_subset(self, idx)

    monkeypatch.setattr(Scorer, "subset", subset)
    scorer = scorer_of(sweep)
    result = METHODS["learned"](Kitchen(cands(sweep["members"]), scorer), learned_epochs=2)
    fitted, scored = seen
    assert not fitted & scored and fitted | scored == set(range(scorer.size))
    assert result.held_out == len(scored)
    weights = [float(s.reason.removeprefix("mean weight ")) for s in result.steps if s.accepted]
    assert sum(weights) == pytest.approx(1.0, abs=1e-3), "a convex mix of the ingredients"


def test_learned_soup_refuses_beyond_its_memory_limit(sweep):
    one_mib = [{"w": torch.full((2**18,), float(i))} for i in range(4)]  # 1 MiB of float32 each
    with pytest.raises(SoupsError, match="learned soup: 3 ingredients of 1 MiB each exceed learned_max_mb=2"):
        load_all(Kitchen(cands(one_mib), scorer_of(sweep)), 2)
    states, names, _ = load_all(Kitchen(cands(one_mib), scorer_of(sweep)), 4)
    assert names == ["m0", "m1", "m2", "m3"] and len(states) == 4


def test_method_parameters_are_checked_by_name():
    with pytest.raises(SoupsError, match="tie='sometimes' must be one of ge, strict"):
        METHODS["greedy"].resolve({"tie": "sometimes"})
    with pytest.raises(SoupsError, match="soup method wise_ft: wise_steps='many' is not a valid int"):
        METHODS["wise_ft"].resolve({"wise_steps": "many"})
    assert METHODS["wise_ft"].resolve({"wise_steps": "4", "tie": "ge"}) == {"wise_steps": 4}


def test_learned_soup_fits_on_batches_that_mix_the_classes(sweep, monkeypatch):
    """val lists images class by class; fitting the mix on batches of one class fits it to that
    class (fit loss 1.25 in class order, 0.23 shuffled on a toy set)."""
    from soups.soup import learned

    assert sweep["val"].labels.tolist() == sorted(sweep["val"].labels.tolist()), "the fixture: class order"
    seen, real = {}, learned.fit_mix

    def spy(scorer, *args, **kwargs):
        seen["labels"] = scorer.held_out.labels.tolist()
        return real(scorer, *args, **kwargs)

    monkeypatch.setattr(learned, "fit_mix", spy)
    METHODS["learned"](Kitchen(cands(sweep["members"]), scorer_of(sweep)))
    labels = seen["labels"]
    assert len(set(labels)) == 3 and labels != sorted(labels), "the images it fits on, in class order"
