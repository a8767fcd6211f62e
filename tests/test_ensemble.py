import numpy as np
import pytest
import torch

from soups import SoupsError
from soups.ensemble import attribute_vote, hard_vote, soft_vote
from soups.layouts import get
from soups.layouts.mask import mask_label

MASK = get("mask").attributes


def test_soft_vote_is_the_mean_of_probabilities():
    a = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    b = torch.tensor([[0.3, 0.7], [0.2, 0.8]])
    assert torch.allclose(soft_vote([a, b]), torch.tensor([[0.6, 0.4], [0.3, 0.7]]))


def test_weighted_soft_vote_follows_the_weights():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(soft_vote([a, b], [3, 1]), torch.tensor([[0.75, 0.25]]))
    assert soft_vote([a, b], [0.2, 0.8]).argmax(1).item() == 1
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(SoupsError, match="weights"):
            soft_vote([a, b], bad)


def test_hard_vote_majority_and_ties_go_to_the_best_member():
    best, second, third = np.array([0, 1, 2, 5]), np.array([1, 1, 3, 6]), np.array([1, 2, 4, 5])
    # image 0: 1 wins 2-1; image 1: 1 wins; image 2: three-way tie -> best member's 2; image 3: 5 wins
    assert hard_vote([best, second, third]).tolist() == [1, 1, 2, 5]
    assert hard_vote([second, best]).tolist() == [1, 1, 3, 6], "two-way ties: the first (best) member"


def test_attribute_vote_votes_mask_gender_and_age_separately():
    # three members disagree on the class but agree attribute by attribute, two against one
    m1 = np.array([mask_label(0, 1, 2)])  # worn, female, old
    m2 = np.array([mask_label(2, 1, 0)])  # not worn, female, young
    m3 = np.array([mask_label(0, 0, 0)])  # worn, male, young
    assert hard_vote([m1, m2, m3]).tolist() == m1.tolist(), "three different classes: the best member's"
    assert attribute_vote([m1, m2, m3], MASK).tolist() == [mask_label(0, 1, 0)]


def test_an_empty_ensemble_is_refused():
    with pytest.raises(SoupsError):
        soft_vote([])
    with pytest.raises(SoupsError):
        hard_vote([])


def test_unreadable_marks_abstain():
    assert hard_vote([np.array([-1, 4, -1]), np.array([3, 5, -1]), np.array([3, 5, -1])]).tolist() == [
        3,
        5,
        -1,
    ]
    voted = attribute_vote([np.array([-1]), np.array([mask_label(1, 0, 2)])], MASK)
    assert voted.tolist() == [mask_label(1, 0, 2)]


def test_voting_over_prediction_files(tmp_path):
    import pandas as pd

    from soups.predictions import vote_on_files

    ids = ["a.jpg", "b.jpg", "c.jpg"]
    files = []
    for k, ans in enumerate([[0, 5, 17], [1, 5, 16], [1, 4, 16]]):
        files.append(str(tmp_path / f"p{k}.csv"))
        pd.DataFrame({"ImageID": ids, "ans": ans}).to_csv(files[-1], index=False)
    voted = vote_on_files(files, "hard")
    assert voted.ImageID.tolist() == ids and voted.ans.tolist() == [1, 5, 16]
    pd.DataFrame({"ImageID": ids[::-1], "ans": [0, 0, 0]}).to_csv(tmp_path / "shuffled.csv", index=False)
    with pytest.raises(SoupsError, match="shuffled.csv lists other images"):
        vote_on_files([files[0], str(tmp_path / "shuffled.csv")], "hard")
