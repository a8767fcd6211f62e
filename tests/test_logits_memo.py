"""Logits are computed once per (weights, images, feeding) on this machine and read back by any
later step; changed weights or images never read an old entry."""

import numpy as np
import pytest
import timm
import torch

from soups import evaluate, logits_memo
from soups import predict as predict_module
from soups.evaluate import EvalSet, Scorer
from soups.models import Checkpoint
from soups.predictions import predict_member


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value.clone()

    return compute, calls


def test_same_weights_and_images_compute_once_anything_else_computes_again():
    images = torch.randint(0, 255, (6, 8, 8, 3), dtype=torch.uint8)
    state = {"w": torch.ones(3)}
    args = ([0.5] * 3, [0.25] * 3, "cpu")
    compute, calls = counting(torch.randn(6, 4))
    first, seconds = logits_memo.memo_logits("m", state, images, *args, compute)
    again, seconds_again = logits_memo.memo_logits("m", {"w": torch.ones(3)}, images.clone(), *args, compute)
    assert len(calls) == 1 and torch.equal(first, again) and seconds == seconds_again
    logits_memo.memo_logits("m", {"w": torch.ones(3) * 2}, images, *args, compute)  # other weights
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    logits_memo.memo_logits("m", state, changed, *args, compute)  # one pixel differs
    logits_memo.memo_logits("m", state, images, [0.4] * 3, [0.25] * 3, "cpu", compute)  # other normalisation
    logits_memo.memo_logits("other", state, images, *args, compute)  # same weights, other architecture
    assert len(calls) == 5


def test_a_damaged_entry_is_computed_again_and_replaced(cache):
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    compute, calls = counting(torch.randn(2, 3))
    logits_memo.memo_logits("m", "d", images, [0] * 3, [1] * 3, "cpu", compute)
    (entry,) = (cache / "logits").rglob("*.pt")
    entry.write_bytes(b"not a tensor file")
    again, _ = logits_memo.memo_logits("m", "d", images, [0] * 3, [1] * 3, "cpu", compute)
    assert len(calls) == 2 and torch.equal(again, torch.load(entry, weights_only=True)["logits"])
    assert not list((cache / "logits").rglob("*.tmp"))


def test_an_unwritable_cache_costs_time_never_the_result(cache):
    cache.mkdir()
    (cache / "logits").write_text("a file where the folder should be")
    compute, calls = counting(torch.ones(1, 2))
    for _ in range(2):
        logits, _ = logits_memo.memo_logits(
            "m", "d", torch.zeros(1, 2, 2, 3, dtype=torch.uint8), [0], [1], "cpu", compute
        )
        assert torch.equal(logits, torch.ones(1, 2))
    assert len(calls) == 2


def test_the_ensemble_reads_what_the_soup_step_scored_and_tta_views_are_kept_apart(monkeypatch):
    model = timm.create_model("test_efficientnet", num_classes=3)
    ckpt = Checkpoint(
        model.state_dict(), "test_efficientnet", 3, ["a", "b", "c"], 16, "s", [0.5] * 3, [0.5] * 3
    )
    pixels = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    evalset = EvalSet(torch.from_numpy(pixels), torch.zeros(10, dtype=torch.long), 3)
    scorer = Scorer(ckpt.build(), evalset, ckpt.mean, ckpt.std, batch_size=4)
    forwarded = []
    real = evaluate.predict
    for module in (evaluate, predict_module):
        monkeypatch.setattr(module, "predict", lambda m, s, *a: forwarded.append(len(s)) or real(m, s, *a))
    as_scored = scorer.logits(ckpt.state_dict, recalibrate=False)  # e.g. a soup step's test scores
    probs, _ = predict_member(ckpt, pixels, "none", "cpu")
    assert forwarded == [10] and torch.allclose(probs, as_scored.softmax(1))
    both, _ = predict_member(ckpt, pixels, "hflip", "cpu")  # the flipped view is new work
    assert forwarded == [10, 10]
    flipped = real(
        ckpt.build(),
        EvalSet(torch.from_numpy(pixels[:, :, ::-1].copy()), evalset.labels, 3),
        [0.5] * 3,
        [0.5] * 3,
    )
    assert torch.allclose(both, (as_scored.softmax(1) + flipped.softmax(1)) / 2, atol=1e-6)
    # Recomputed BatchNorm statistics depend on the training images too: never read back by weights.
    scorer.bn_images = evalset
    scorer.logits(ckpt.state_dict)
    assert forwarded == [10, 10, 10]
