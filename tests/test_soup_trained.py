"""Soups of real (tiny, timm) models: early rejection keeps the picks of a full evaluation,
BatchNorm recalibration, memory flat in the number of candidates, and the best ingredient scored
with the treatment every soup gets."""

import gc

import pytest
import torch

from soups.data import decode, make_splits
from soups.evaluate import EvalSet, Scorer
from soups.layouts import read_layout
from soups.models import create_model, normalisation
from soups.soup import Candidate, greedy_soup
from tests.conftest import make_imagefolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BatchNorm model fine-tuned briefly, its held-out set, and its training images."""
    root = make_imagefolder(tmp_path_factory.mktemp("soupdata"), per_class=20)
    splits = make_splits(read_layout("imagefolder", root), 0.3, 0.0, 0)
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3)
    mean, std = normalisation(model)
    train = EvalSet.from_decoded(decode(splits.train, 24), 3)
    val = EvalSet.from_decoded(decode(splits.val, 24), 3)
    from soups.data import model_input

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    # Full batches: the class is each image's brightness, which BatchNorm's batch statistics wash
    # out of small batches holding one class (the split lists images by class).
    for _ in range(60):
        x, y = train.images, train.labels
        loss = torch.nn.functional.cross_entropy(model(model_input(x, mean, std)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scorer = Scorer(create_model("test_efficientnet", 3), val, mean, std)
    assert scorer.correct(model.state_dict()) >= 0.9 * len(val), "the fixture model learned"
    return model, val, train, mean, std


def noisy(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state.items()
    }


def test_early_rejection_keeps_the_picks_of_a_full_evaluation(trained):
    model, val, _, mean, std = trained
    base = model.state_dict()
    ingredients = [noisy(base, s, i) for i, s in enumerate([0.0, 0.02, 0.5, 0.01, 1.0, 0.03, 0.8])]
    early = Scorer(create_model("test_efficientnet", 3), val, mean, std, batch_size=4)
    full = Scorer(create_model("test_efficientnet", 3), val, mean, std, batch_size=4)
    picked = greedy_soup(cands_of(ingredients), early.correct, len(val))
    reference = greedy_soup(cands_of(ingredients), lambda s, m: full.correct(s, None), len(val))
    assert picked.ingredients == reference.ingredients and picked.correct == reference.correct
    assert len(picked.ingredients) < len(ingredients), "the large-noise candidates are refused"
    assert early.images_scored < full.images_scored == len(ingredients) * len(val)


def cands_of(states):
    return [
        Candidate(f"m{i}", lambda s=s: {k: v.clone() for k, v in s.items()}) for i, s in enumerate(states)
    ]


def test_bn_recalibration_recomputes_running_statistics(trained):
    model, val, train, mean, std = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bn1.running_mean"] += 5.0  # what averaging can do to statistics
    scorer = Scorer(create_model("test_efficientnet", 3), val, mean, std, bn_images=train)
    scorer.load(state)
    fixed = scorer.model.state_dict()["bn1.running_mean"]
    assert not torch.allclose(fixed, state["bn1.running_mean"])
    assert torch.allclose(fixed, model.state_dict()["bn1.running_mean"], atol=0.5)
    scorer.load(state, recalibrate=False)
    assert torch.equal(scorer.model.state_dict()["bn1.running_mean"], state["bn1.running_mean"])


@pytest.mark.slow
def test_soup_memory_is_flat_in_the_number_of_candidates(trained):
    """Count tensors alive while each candidate soup is scored: no more with 12 candidates than with 3."""
    model, val, _, mean, std = trained
    base = model.state_dict()
    peaks = {}
    for n in (3, 12):
        scorer = Scorer(create_model("test_efficientnet", 3), val, mean, std)
        peak = 0

        def score(state, max_errors, scorer=scorer):
            nonlocal peak
            gc.collect()
            peak = max(peak, sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
            return scorer.correct(state, max_errors)

        stream = (Candidate(f"m{i}", lambda i=i: noisy(base, 0.001, i)) for i in range(n))
        greedy_soup(stream, score, len(val))
        peaks[n] = peak
    assert peaks[12] <= peaks[3] + 5, peaks


def test_greedy_scores_its_best_ingredient_with_the_treatment_of_every_soup(trained):
    """With BatchNorm recomputed, the best ingredient alone is recomputed too: a gain that comes
    from recomputing alone is never counted as the soup's."""
    model, val, train, mean, std = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bn1.running_mean"] += 5.0  # statistics a recomputation repairs
    plain = Scorer(create_model("test_efficientnet", 3), val, mean, std)
    recal = Scorer(create_model("test_efficientnet", 3), val, mean, std, bn_images=train)
    assert plain.correct(state) < recal.correct(state), "the fixture: recomputing changes the score"
    result = greedy_soup(cands_of([state]), recal.correct, len(val))
    assert result.best_correct == recal.correct(state)


def test_batchnorm_is_recomputed_on_shuffled_training_images(tmp_path):
    """Layouts list images class by class; the recalibration sample must mix the classes in every
    batch (in class order the demo's uniform soup lost 1.29 points)."""
    from soups.recipe import Recipe
    from soups.steps.soup.ingredients import held_out_sets

    root = make_imagefolder(tmp_path / "folders", per_class=20)
    splits = make_splits(read_layout("imagefolder", root), 0.2, 0.0, 0)
    recipe = Recipe(data=str(root), img_size=16, workers=0)
    for images in (0, 30):
        _, _, bn = held_out_sets(splits, recipe, 3, images)
        labels = bn.labels.tolist()
        assert len(labels) == (images or len(splits.train))
        assert all(len(set(labels[k : k + 8])) > 1 for k in range(0, len(labels) - 8, 8)), labels
