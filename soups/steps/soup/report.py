"""What a soup step found, as it reports it: each method's soup as it ships with the test images
it gets right, the best ingredient scored the same way, the gains between them with their 95%
intervals, and the table of every candidate's decision. No MLflow names here beyond reading runs."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from soups import tracking
from soups.evaluate import EvalSet, Scorer, metrics
from soups.models import weights_digest
from soups.significance import Gain, paired_gain
from soups.soup import SoupResult, StateDict

BASELINE = "uniform"  # always reported beside the chosen method


@dataclass
class Dish:
    """One method's soup as it would ship (BatchNorm statistics recomputed when the step recomputes
    them), or why it could not be made; `test_correct` flags each test image it gets right."""

    method: str
    result: SoupResult | None
    state: StateDict | None = None
    test_correct: torch.Tensor | None = None
    error: str = ""
    # (held-out images scored, BatchNorm images forwarded, models scored) to cook it
    work: tuple[int, int, int] = (0, 0, 0)
    test_gain: Gain | None = None  # over the best ingredient, same test images, same treatment

    @property
    def val_accuracy(self) -> float | None:
        return self.result.accuracy if self.result else None

    @property
    def test_accuracy(self) -> float | None:
        return accuracy_of(self.test_correct)

    @property
    def n_ingredients(self) -> int:
        return len(self.result.ingredients) if self.result else 0


@dataclass
class Baseline:
    """The best usable ingredient, scored by the soup step as every soup is (same images, same
    BatchNorm treatment): what every gain is measured against."""

    run_id: str
    val_accuracy: float
    test_correct: torch.Tensor | None
    logged_val_accuracy: float | None  # what its run logged while training, as trained

    @property
    def test_accuracy(self) -> float | None:
        return accuracy_of(self.test_correct)


def accuracy_of(correct: torch.Tensor | None) -> float | None:
    return None if correct is None else float(correct.float().mean())


@dataclass
class History:
    """Which soup this one continued (none: `why` says why it started over), every candidate run
    it considered in rank order, the new ones among them, and what the reused scores saved."""

    continued_from: str
    why: str
    considered: list[str]
    new: list[str]
    revisited: list[str]  # new runs ranked above runs the earlier soup considered
    scores_reused: int
    models_scored: int


def history_of(earlier, runs: list, scorer: Scorer) -> History:
    considered = [r.info.run_id for r in runs]
    before = set(earlier.considered) if earlier.run_id else set()
    last_old = max((i for i, r in enumerate(considered) if r in before), default=-1)
    new = [r for r in considered if r not in before]
    revisited = [r for r in new if considered.index(r) < last_old]
    return History(
        earlier.run_id, earlier.why, considered, new, revisited, scorer.book.reused, scorer.models_scored
    )


@dataclass
class SoupReport:
    run_id: str
    method: str
    params: dict
    dishes: list[Dish]  # the chosen method's first
    best: Baseline
    candidates: int
    n_usable: int
    images_scored: int
    images_full: int
    recalibration_images: int
    downloaded: int
    table: pd.DataFrame
    treatment: str = ""  # how every model was scored: BatchNorm statistics recomputed, or as trained
    registry: str = ""
    history: History | None = None

    @property
    def chosen(self) -> Dish:
        return self.dishes[0]

    def add_history(self, history: History) -> None:
        """What this soup continued; the table marks the runs new to it."""
        self.history = history
        self.table["new"] = self.table.run_id.isin(history.new)

    @property
    def best_val_accuracy(self) -> float:
        return self.best.val_accuracy

    @property
    def best_test_accuracy(self) -> float | None:
        return self.best.test_accuracy


def shipped(
    state: StateDict, scorer: Scorer, recal: bool, test: EvalSet | None
) -> tuple[StateDict, torch.Tensor | None]:
    """A model as it ships, which is the one that was scored (BatchNorm statistics recomputed on
    the training images when the step recomputes them, single models too), and which test images
    it gets right."""
    if recal:
        raw = state
        state = {k: v.detach().clone() for k, v in scorer.load(state).state_dict().items()}
        # Recomputing BatchNorm statistics of these weights gives the same model again: every
        # score the book holds for the raw weights holds for them (a champion scored later).
        scorer.book.alias(weights_digest(state), weights_digest(raw))
    if test is None:
        return state, None
    return state, scorer.logits(state, test, recalibrate=False).argmax(1) == test.labels


def best_ingredient(result: SoupResult, ingredients, runs: list, scorer: Scorer, recal, test) -> Baseline:
    """The best usable ingredient scored on all of val and on test exactly as the soups are."""
    by_id = {r.info.run_id: r for r in runs}
    best_id = next(s.name for s in result.steps if s.status != "skipped")
    state = ingredients.load(by_id[best_id])
    # The method scored it already on all of val, as it scored the soups; not a method that ranks
    # or fits on part of val and scores on the rest (learned; greedy with accept=split).
    val = result.best_correct if result.scored_on is None else scorer.correct(state)
    _, test_correct = shipped(state, scorer, recal, test)
    return Baseline(best_id, val / scorer.size, test_correct, tracking.rank_score(by_id[best_id]))


def ingredient_table(steps, by_id: dict, own_test: dict, held_out: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "rank": s.rank,
                "run_id": s.name,
                "i": tracking.member_of(by_id[s.name]),
                "val_accuracy": tracking.rank_score(by_id[s.name]),
                "test_accuracy": own_test.get(s.name),
                "status": s.status,
                "reason": s.reason,
                "soup_val_accuracy": None if s.soup_correct is None else s.soup_correct / held_out,
            }
            for s in steps
        ]
    )


def assemble(
    run_id: str, runs: list, params: dict, dishes, best: Baseline, ingredients, scorer, test
) -> SoupReport:
    """The report of a soup step: gains with their intervals, and the ingredient table."""
    result = dishes[0].result
    by_id = {r.info.run_id: r for r in runs}
    usable = [s.name for s in result.steps if s.status != "skipped"]
    if best.test_correct is not None:
        for dish in dishes:
            if dish.test_correct is not None:
                dish.test_gain = paired_gain(dish.test_correct, best.test_correct)
    # Each usable ingredient's own test score as trained: the one `evaluate` logged into its run
    # (same split, so the same images), else scored here, reloaded one at a time from the cache.
    own_test = {}
    for name in usable:
        logged = tracking.test_score(by_id[name])
        if logged is None and test is not None:
            state = ingredients.load(by_id[name])
            logged = metrics(scorer.logits(state, test, recalibrate=False), test.labels)["accuracy"]
        own_test[name] = logged
    return SoupReport(
        run_id,
        dishes[0].method,
        params,
        dishes,
        best,
        len(runs),
        len(usable),
        dishes[0].work[0],
        len(usable) * scorer.size,
        dishes[0].work[1],
        ingredients.downloaded,
        ingredient_table(result.steps, by_id, own_test, result.held_out),
        treatment(scorer),
    )


def treatment(scorer: Scorer) -> str:
    if scorer.bn_images is None:
        return "weights as they are"
    return f"BatchNorm statistics recomputed on the same {len(scorer.bn_images)} shuffled training images"
