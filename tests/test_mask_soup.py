"""The seed's soup leaks on the mask layout, never to come back: the greedy soup picks on val only
(test is read after), and BatchNorm recalibration reads training images only, so the shipped
soup scores as its run logged."""

import dataclasses

import pytest

from soups import tracking
from soups.recipe import load_recipe
from soups.steps.finetune import finetune
from tests.conftest import TINY, write_recipe


@pytest.mark.slow
def test_greedy_soup_selects_on_val_only(tmp_path, tracking_uri, mask_root, monkeypatch):
    """Record every scoring call: all that can change the picks reads val; test only after."""
    from soups.evaluate import Scorer
    from soups.soup import METHODS
    from soups.steps.soup import step as soup_step

    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        experiment="noleak",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 1, "test_ratio": 0.4},
        space={"seed": {"int": [0, 999]}},
    )
    for i in range(3):
        finetune(load_recipe(recipe_path, {"i": i}))
    state = {"selecting": False, "reads": []}
    greedy = METHODS["greedy"]

    def watched(*args, **kwargs):
        state["selecting"] = True
        try:
            return greedy.cook(*args, **kwargs)
        finally:
            state["selecting"] = False

    real_correct, real_logits = Scorer.correct, Scorer.logits

    def correct(self, *args, **kwargs):
        state["reads"].append((state["selecting"], "held_out", len(self.held_out)))
        return real_correct(self, *args, **kwargs)

    def logits(self, st, evalset=None, recalibrate=True):
        state["reads"].append((state["selecting"], "logits", len(evalset or self.held_out)))
        return real_logits(self, st, evalset, recalibrate)

    monkeypatch.setitem(METHODS, "greedy", dataclasses.replace(greedy, cook=watched))
    monkeypatch.setattr(Scorer, "correct", correct)
    monkeypatch.setattr(Scorer, "logits", logits)
    recipe = load_recipe(recipe_path)
    report = soup_step.make_soup(recipe, {}, soup_step.SoupOptions(bn_recalibrate="off"))
    from soups.recipe import load_splits

    splits = load_splits(load_recipe(recipe_path))
    n_val, n_test = len(splits.val), len(splits.test)
    val_sizes = {n_val, n_val // 2, n_val - n_val // 2}  # all of val, or a half (greedy's split rule)
    assert n_test not in val_sizes, "the sizes tell the sets apart"
    during = [r for r in state["reads"] if r[0]]
    assert during and all(kind == "held_out" and n in val_sizes for _, kind, n in during), during
    assert any(not sel and n == n_test for sel, _, n in state["reads"]), "test is still reported"
    assert report.chosen.test_accuracy is not None


@pytest.mark.slow
def test_bn_recalibration_reads_training_images_only_and_the_shipped_soup_scores_as_logged(
    tmp_path, tracking_uri, mask_root, monkeypatch
):
    """BatchNorm statistics of the averaged weights come from training images alone, and the
    checkpoint that ships scores on val exactly what the soup run logged (as infer would load it)."""
    from soups import data, evaluate
    from soups.evaluate import EvalSet, Scorer
    from soups.models import load_checkpoint
    from soups.recipe import load_splits
    from soups.steps.soup import step as soup_step

    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        experiment="bnleak",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 1, "test_ratio": 0.3},
        space={"seed": {"int": [0, 999]}},
    )
    for i in range(3):
        finetune(load_recipe(recipe_path, {"i": i}))
    decoded, recalibrated = {}, []
    real_decode, real_recal = data.decode, evaluate.recalibrate_bn

    def decode(samples, *args, **kwargs):
        out = real_decode(samples, *args, **kwargs)
        decoded[kwargs.get("desc", "")] = (list(samples.keys), out)
        return out

    def recalibrate(model, images, *args, **kwargs):
        recalibrated.append(images.images.data_ptr())
        return real_recal(model, images, *args, **kwargs)

    monkeypatch.setattr(data, "decode", decode)
    monkeypatch.setattr(evaluate, "recalibrate_bn", recalibrate)
    report = soup_step.make_soup(
        load_recipe(recipe_path), {}, soup_step.SoupOptions(method="uniform", bn_recalibrate="on")
    )
    splits = load_splits(load_recipe(recipe_path))
    bn_keys, bn_decoded = decoded["decode train (BatchNorm)"]
    assert set(bn_keys) <= set(splits.train.keys) and not set(bn_keys) & (
        set(splits.val.keys) | set(splits.test.keys)
    )
    assert recalibrated and set(recalibrated) == {EvalSet.from_decoded(bn_decoded, 18).images.data_ptr()}
    run = tracking.get_run(report.run_id)
    shipped = load_checkpoint(tracking.cached_checkpoint(run)[0])
    val = EvalSet.from_decoded(real_decode(splits.val, shipped.img_size), shipped.num_classes)
    correct = Scorer(shipped.build(), val, shipped.mean, shipped.std).correct(shipped.state_dict)
    assert report.chosen.n_ingredients == 3 and correct == round(run.data.metrics["val_accuracy"] * len(val))
