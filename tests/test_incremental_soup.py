"""A soup that continues an earlier one scores only what is new and gives what starting over gives:
its held-out scores come back from the earlier soup's book, keyed by the exact weights and images."""

import mlflow
import pytest
import torch

from soups import tracking
from soups.evaluate import EvalSet, Scorer
from soups.models import create_model
from soups.recipe import load_recipe
from soups.score_book import ScoreBook
from soups.steps.finetune import finetune
from soups.steps.soup import report as soup_report
from soups.steps.soup.report import history_of
from soups.steps.soup.step import SoupOptions, make_soup
from soups.tracking import Earlier
from tests.conftest import TINY, write_recipe


def test_a_score_comes_back_from_the_book_only_for_the_same_weights_and_what_it_proved():
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3)
    images = torch.randint(0, 255, (40, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    scorer = Scorer(model, EvalSet(images, labels, 3), (0.5,) * 3, (0.5,) * 3, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    correct = scorer.correct(state)
    assert scorer.models_scored == 1 and scorer.correct(state) == correct and scorer.models_scored == 1
    # an early stop is kept as what it proved: more errors than allowed
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    assert scorer.correct(other, max_errors=0) is None and scorer.models_scored == 2
    assert scorer.correct(other, max_errors=0) is None and scorer.models_scored == 2  # from the book
    full = scorer.correct(other)  # a looser question runs the model again
    assert scorer.models_scored == 3 and full is not None
    # another scoring (half the images) is another key; the book travels as JSON
    half = scorer.subset(torch.arange(20))
    half.correct(state)
    assert scorer.models_scored == 4
    again = Scorer(
        model,
        EvalSet(images, labels, 3),
        (0.5,) * 3,
        (0.5,) * 3,
        16,
        book=ScoreBook.from_json(scorer.book.to_json()),
    )
    assert again.correct(state) == correct and again.correct(other) == full and again.models_scored == 0
    assert ScoreBook.from_json({"version": -1, "entries": scorer.book.entries}).entries == {}


def test_recomputed_batchnorm_statistics_share_scores_only_where_scoring_recomputes_them():
    torch.manual_seed(1)
    model = create_model("test_efficientnet", 3)
    images = torch.randint(0, 255, (32, 32, 32, 3), dtype=torch.uint8)
    held, bn = EvalSet(images[:16], torch.randint(0, 3, (16,)), 3), EvalSet(images[16:], torch.zeros(16), 3)
    book = ScoreBook()
    recal = Scorer(model, held, (0.5,) * 3, (0.5,) * 3, 8, bn_images=bn, book=book)
    plain = Scorer(model, held, (0.5,) * 3, (0.5,) * 3, 8, book=book)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    recal.correct(raw), plain.correct(raw)
    shipped, _ = soup_report.shipped(raw, recal, True, None)  # aliases the recomputing score
    assert recal.correct(shipped) == recal.correct(raw) and recal.models_scored == 1, "from the book"
    plain.correct(shipped)
    assert plain.models_scored == 2, "without recomputing, the shipped weights are another model"


def test_new_runs_ranked_above_considered_ones_are_named():
    class R:
        def __init__(self, rid):
            self.info = type("I", (), {"run_id": rid})

    scorer = Scorer(
        create_model("test_efficientnet", 3),
        EvalSet(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(0), 3),
        (0.5,) * 3,
        (0.5,) * 3,
    )
    h = history_of(Earlier("s1", ["a", "b", "c"]), [R(x) for x in "adbce"], scorer)
    assert h.new == ["d", "e"] and h.revisited == ["d"] and h.continued_from == "s1"
    fresh = history_of(Earlier(why="no champion yet"), [R(x) for x in "ab"], scorer)
    assert fresh.new == ["a", "b"] and fresh.revisited == [] and fresh.continued_from == ""


def says_what_it_continued(client, run_id: str, continued: str, old: list, new: list) -> None:
    """The soup's registered version and run note name the soup it continued and its new runs."""
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    tags = version.tags
    assert tags[tracking.CONTINUED_FROM] == continued
    assert tags[tracking.NEW_RUNS] == ",".join(new) and tags[tracking.CONSIDERED_RUNS] == ",".join(old + new)
    note = client.get_run(run_id).data.tags[tracking.NOTE]
    assert f"{len(new)} of {len(old + new)} candidate runs are new" in note and "(new)" in note


@pytest.mark.slow
def test_a_champion_of_four_then_two_new_members_scores_only_the_new_and_equals_starting_over(
    tmp_path, fmnist_root, tracking_uri, monkeypatch
):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(
        tmp_path / "tiny.yaml",
        experiment="incremental",
        data=str(fmnist_root),
        layout="fashion-mnist",
        start="auto",
        **{**TINY, "epochs": 1, "start_epochs": 1},
        space={"seed": {"int": [0, 999]}, "lr": {"log_uniform": [1e-3, 3e-3]}},
    )
    client = mlflow.MlflowClient()

    def members(indices, ranks, **fixed):  # their val_accuracy as logged decides the rank order
        runs = [finetune(load_recipe(recipe, {"i": i, **fixed})) for i in indices]
        for run, value in zip(runs, ranks, strict=True):
            client.log_metric(run, tracking.RANK_METRIC, value, step=99)
        return runs

    def soup(**opts):
        return make_soup(load_recipe(recipe), {}, SoupOptions(bn_recalibrate="on", **opts))

    old, new = members(range(4), [0.99, 0.98, 0.97, 0.96]), []
    for accept in ("each", "split"):
        params = {"accept": accept}
        # the champion of the four (the new ones, once trained, rank below them)
        first = soup(method_params=params, continue_from="none", max_candidates=4)
        assert first.history.continued_from == "" and first.history.new == old
        assert first.chosen.work[2] >= 4, "from scratch, every member is scored"
        if accept == "each":
            # poor members (a learning rate that diverges): below the four on half A of val too,
            # where accept=split ranks
            new = members(range(4, 6), [0.5, 0.4], lr=5.0)
        # `each`: the default `from=auto` continues the champion (the first soup of an empty registry)
        later = soup(method_params=params, **({} if accept == "each" else {"continue_from": first.run_id}))
        h = later.history
        assert h.continued_from == first.run_id and h.new == new and h.considered == old + new
        assert h.revisited == [] and h.scores_reused > 0
        scored = later.chosen.work[2]
        # each: one candidate soup per new run; split: each new run ranked on half A, then at
        # most one candidate soup per new run on half B
        assert scored <= (2 if accept == "each" else 4), (accept, scored, later.table.reason.tolist())
        scratch = soup(method_params=params, continue_from="none")
        assert later.chosen.result.ingredients == scratch.chosen.result.ingredients
        assert later.chosen.result.correct == scratch.chosen.result.correct
        assert scratch.chosen.work[2] > scored
        # the curve spans the whole history, not the increment
        assert len(later.table) == 6 and list(later.table.status) == list(scratch.table.status)
        assert list(later.table.new) == [False] * 4 + [True] * 2

        says_what_it_continued(client, later.run_id, first.run_id, old, new)

        # a third soup continues the second: nothing new, nothing scored for the method
        third = soup(method_params=params, continue_from=later.run_id)
        assert third.history.new == [] and third.chosen.work[2] == 0
        assert third.chosen.result.ingredients == scratch.chosen.result.ingredients
