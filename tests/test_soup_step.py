"""The soup step compares like with like: the recipe's split decides the soup's, the best
ingredient is scored as the soups are, each gain has its interval, and the champion moves on a
comparison made on the same images."""

import time

import mlflow
import pytest

from soups import SoupsError, tracking
from soups.recipe import load_recipe
from soups.steps.finetune import finetune
from soups.steps.soup.step import SoupOptions, make_soup
from tests.conftest import TINY, write_recipe


@pytest.fixture
def recipe_path(tmp_path, fmnist_root):
    return write_recipe(
        tmp_path / "tiny.yaml",
        experiment="like",
        data=str(fmnist_root),
        layout="fashion-mnist",
        start="auto",
        **{**TINY, "epochs": 1, "start_epochs": 1},
        space={"seed": {"int": [0, 999]}, "lr": {"log_uniform": [1e-3, 3e-3]}},
    )


@pytest.mark.slow
def test_soups_are_made_for_the_recipes_split_and_compared_like_with_like(
    recipe_path, tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    members = [finetune(load_recipe(recipe_path, {"i": i})) for i in range(3)]
    stray = finetune(load_recipe(recipe_path, {"i": 3, "split_seed": 7}))
    client = mlflow.MlflowClient()
    client.log_metric(stray, tracking.RANK_METRIC, 1.0, step=99)  # it ranks first

    opts = SoupOptions(bn_recalibrate="on", method_params={"accept": "each"})  # scores on all of val
    report = make_soup(load_recipe(recipe_path), {}, opts)
    table = report.table.set_index("run_id")
    assert table.loc[stray, "status"] == "skipped" and "another split" in table.loc[stray, "reason"]
    assert report.best.run_id in members and set(report.chosen.result.ingredients) <= set(members)
    # the best ingredient is scored as the soups are: recomputed statistics, the soup's images
    assert report.best.val_accuracy == report.chosen.result.best_accuracy
    assert "recomputed" in report.treatment
    gain = report.chosen.test_gain
    assert gain is not None and gain.low <= gain.gain <= gain.high and gain.n == 50
    assert gain.gain == pytest.approx(report.chosen.test_accuracy - report.best_test_accuracy)
    run = tracking.get_run(report.run_id)
    m = run.data.metrics
    assert m["test_gain_over_best_ingredient_low"] <= m["test_gain_over_best_ingredient"]
    assert m["val_gain_over_best_ingredient"] == pytest.approx(report.chosen.result.val_gain)
    assert "from zero" in run.data.tags[tracking.NOTE]

    # A learned soup is scored on the half of val it did not fit on, and the default greedy rule
    # on the half it did not rank on: the gain, and the champion it is compared with, are measured
    # on that half too.
    for method in ("learned", "greedy"):
        half = make_soup(load_recipe(recipe_path), {}, SoupOptions(method=method, bn_recalibrate="on"))
        result = half.chosen.result
        assert (
            result.scored_on is not None
            and result.held_out == len(result.scored_on) < report.chosen.result.held_out
        )
        metrics = tracking.get_run(half.run_id).data.metrics
        assert metrics["val_gain_over_best_ingredient"] == pytest.approx(
            result.accuracy - result.best_accuracy
        )
        assert "same images" in half.registry, half.registry
        assert (
            f"on {result.held_out} images (best ingredient there"
            in tracking.get_run(half.run_id).data.tags[tracking.NOTE]
        )
    assert result.correct >= result.best_correct, "greedy's split rule never ships below its baseline"


def test_promotions_take_turns_in_version_order_and_judge_the_champion_of_their_turn(tracking_uri, tmp_path):
    """The champion is read and scored when a version's turn comes, after every earlier pending
    version was decided; 'no such alias' (and no such model) means none; the outcome is tagged."""
    import threading
    import time

    client = mlflow.MlflowClient()
    assert tracking.champion("nobody") is None
    client.create_registered_model("m")
    assert tracking.champion("m") is None
    for _ in range(4):
        client.create_model_version("m", source=str(tmp_path), tags={tracking.PROMOTION: tracking.PENDING})
    scores = {"1": 0.5, "2": 0.7, "3": 0.6}  # each version's val on the images of the soup being judged

    def judge():
        champ = tracking.champion("m")
        return champ and tracking.Rival(str(champ.version), scores[str(champ.version)], "")

    # version 2 waits while version 1 is pending, however early it asks
    second = []
    waiting = threading.Thread(target=lambda: second.append(tracking.promote("m", 2, 0.7, "s", judge)))
    waiting.start()
    time.sleep(1.5)
    assert waiting.is_alive() and tracking.champion("m") is None, "version 2 went before version 1"
    assert tracking.promote("m", 1, 0.5, "s", judge).startswith("m version 1 is the first champion")
    waiting.join(timeout=30)
    assert "moved to version 2: val 0.7000 beats version 1's 0.5000" in second[0]
    # version 3 is compared with version 2 (the champion of its turn) and stays out
    assert "stays version 2" in tracking.promote("m", 3, 0.6, "s", judge)
    tags = {str(v.version): v.tags[tracking.PROMOTION] for v in client.search_model_versions("name = 'm'")}
    assert tags["1"].startswith("m version 1 is the first") and "stays version 2" in tags["3"]

    # a champion that cannot be read is an error: the alias stays, the version says why
    def unreadable():
        raise SoupsError("could not read m@champion: 503")

    with pytest.raises(SoupsError, match="503"):
        tracking.promote("m", 4, 0.99, "s", unreadable)
    assert str(tracking.champion("m").version) == "2"
    assert (
        client.get_model_version("m", "4").tags[tracking.PROMOTION]
        == "not decided: could not read m@champion: 503"
    )
    # the alias removed meanwhile: the next soup is the first champion again
    client.delete_registered_model_alias("m", tracking.CHAMPION)
    assert "is the first champion" in tracking.promote("m", 4, 0.1, "s", judge)


def test_a_pending_version_whose_step_died_holds_up_one_wait_only(tracking_uri, tmp_path, monkeypatch):
    """A version left pending (its step died between registering and deciding) stops beating:
    after DECIDE_STALE_S on the waiter's own clock it is tagged abandoned, and nobody waits again."""
    from soups.tracking import promotion

    monkeypatch.setattr(promotion, "DECIDE_STALE_S", 1.0)
    client = mlflow.MlflowClient()
    client.create_registered_model("d")
    for _ in range(3):
        client.create_model_version("d", source=str(tmp_path), tags={tracking.PROMOTION: tracking.PENDING})
    assert "first champion" in tracking.promote("d", 2, 0.5, "s", lambda: None)
    dead = client.get_model_version("d", "1").tags[tracking.PROMOTION]
    assert dead.startswith("not decided: abandoned (its promotion beat stopped")
    assert client.get_model_version("d", "2").tags[tracking.PROMOTION_BEAT].endswith("-0"), "it beat"

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError):
        tracking.promote("d", 3, 0.9, "s", broken)
    assert client.get_model_version("d", "3").tags[tracking.PROMOTION] == "not decided: OSError: disk full"


def test_a_slow_version_that_still_beats_is_waited_for_and_a_stalled_one_moves_nothing(
    tracking_uri, tmp_path, monkeypatch
):
    """Version 1 judges for 3 s while beating every 0.2 s: version 2 (stale limit 1 s) waits for
    it instead of taking it for dead. A version whose beat stalled and that a waiter tagged
    abandoned never moves the alias, and its record of the stall stays."""
    import threading

    from soups.tracking import promotion

    monkeypatch.setattr(promotion, "DECIDE_STALE_S", 1.0)
    monkeypatch.setattr(promotion, "BEAT_S", 0.2)
    client = mlflow.MlflowClient()
    client.create_registered_model("w")
    for _ in range(3):
        client.create_model_version("w", source=str(tmp_path), tags={tracking.PROMOTION: tracking.PENDING})

    def slow():
        time.sleep(3)
        return None

    first = threading.Thread(target=lambda: tracking.promote("w", 1, 0.5, "s", slow))
    first.start()
    time.sleep(0.5)
    second = tracking.promote("w", 2, 0.7, "s", lambda: tracking.Rival("1", 0.5, ""))
    first.join(timeout=30)
    assert "moved to version 2" in second, second
    assert client.get_model_version("w", "1").tags[tracking.PROMOTION].startswith("w version 1 is the first")

    # taken for dead while it judged: no move, the waiter's verdict stays
    def judged_while_abandoned():
        client.set_model_version_tag("w", "3", tracking.PROMOTION, "not decided: abandoned (test)")
        return tracking.Rival("2", 0.1, "")

    with pytest.raises(SoupsError, match="abandoned"):
        tracking.promote("w", 3, 0.9, "s", judged_while_abandoned)
    assert str(tracking.champion("w").version) == "2"
    assert client.get_model_version("w", "3").tags[tracking.PROMOTION] == "not decided: abandoned (test)"


def test_a_registered_model_name_that_cannot_be_searched_for_is_refused_before_any_run(
    recipe_path, tracking_uri
):
    with pytest.raises(SoupsError, match=r"registered_model=\"bob's soups\": quotes"):
        make_soup(load_recipe(recipe_path), {}, SoupOptions(), registered_model="bob's soups")
    client = mlflow.MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
