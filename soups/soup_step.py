"""The soup step: ranked ingredient runs in; a soup run, its checkpoint and a registered model
version out. The selection reads only the val split; test is only reported.

gather (rank runs, rebuild the split) -> cook (the chosen method, then the ones compared with it)
-> report (tables, figures) -> publish (the soup run, its checkpoint, the registry)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field

import pandas as pd

from soups import SoupsError, data, options, tracking
from soups.evaluate import EvalSet, Scorer, default_device, has_batchnorm, metrics
from soups.models import (
    create_model,
    normalisation,
)
from soups.options import checked, option
from soups.recipe import Recipe, registered_name
from soups.run_notes import data_parts, rebuilt
from soups.soup import METHODS, Kitchen, SoupResult, StateDict, method
from soups.soup_ingredients import Ingredients, held_out_sets, start_weights
from soups.soup_publish import BASELINE, publish

log = logging.getLogger(__name__)
BN_MODES = ("auto", "on", "off")


METHOD_HELP = "; ".join(
    f"{m.name}: {m.summary}" + (" (needs the ingredients' shared start)" if m.needs_start else "")
    for m in METHODS.values()
)


@dataclass(frozen=True)
class SoupOptions:
    method: str = option("greedy", METHOD_HELP, choices=list(METHODS))
    compare: str = option(
        "",
        "Other methods to cook and report beside it (not registered): comma-separated, or `all`. "
        "The uniform soup is always reported.",
    )
    bn_recalibrate: str = option(
        "auto",
        "Recompute BatchNorm statistics of averaged weights on training images "
        "(auto: when the model has BatchNorm).",
        choices=BN_MODES,
    )
    bn_images: int = option(1000, "Training images used to recompute BatchNorm statistics (0: all).")
    max_candidates: int = option(0, "Consider at most this many top-ranked runs (0: all).")
    filter: str = option("", "Extra MLflow search clause, e.g. \"params.model = 'x'\".")
    parent: str = option("", "Only the child runs of this (sweep) run id.")
    source: str = option("", "Experiment to take ingredients from (default: the soup run's own).")
    method_params: dict = field(default_factory=dict)  # any registered method's parameters, by name

    def methods(self) -> list[str]:
        """The chosen method first, then the compared ones (the uniform baseline always)."""
        method(self.method)
        names = (
            list(METHODS) if self.compare.strip() == "all" else [m.strip() for m in self.compare.split(",")]
        )
        for name in filter(None, names):
            method(name)
        return list(dict.fromkeys([self.method, BASELINE, *filter(None, names)]))


@dataclass
class Dish:
    """One method's soup as it would ship (BatchNorm statistics recomputed when it averages), or
    why it could not be made."""

    method: str
    result: SoupResult | None
    state: StateDict | None = None
    test_accuracy: float | None = None
    error: str = ""
    work: tuple[int, int] = (0, 0)  # (held-out images scored, BatchNorm images forwarded) to cook it

    @property
    def val_accuracy(self) -> float | None:
        return self.result.accuracy if self.result else None

    @property
    def n_ingredients(self) -> int:
        return len(self.result.ingredients) if self.result else 0


@dataclass
class SoupReport:
    run_id: str
    method: str
    params: dict
    dishes: list[Dish]  # the chosen method's first
    best_val_accuracy: float
    best_test_accuracy: float | None
    candidates: int
    n_usable: int
    images_scored: int
    images_full: int
    recalibration_images: int
    downloaded: int
    table: pd.DataFrame
    registry: str = ""

    @property
    def chosen(self) -> Dish:
        return self.dishes[0]


@dataclass
class Gathered:
    runs: list
    top: object
    ref: Recipe
    splits: data.Splits
    filter: str


def gather(run: tracking.Run, recipe: Recipe, given: dict, opts: SoupOptions) -> Gathered:
    """The ranked candidate runs and the held-out split rebuilt from the top run's params."""
    source = tracking.experiment_or_own(opts.source, run)
    extra = " and ".join(c for c in (opts.filter, tracking.parent_filter(opts.parent)) if c)
    runs = tracking.ranked_ingredients(source, extra or None, opts.max_candidates)
    if not runs:
        where = f" matching {extra!r}" if extra else ""
        raise SoupsError(f"no finished ingredient runs in experiment {source}{where}: run finetune first")
    ref, splits = rebuilt(runs[0], given)
    return Gathered(runs, runs[0], ref, splits, extra)


def cook_all(opts: SoupOptions, kitchen_for, scorer: Scorer, recal: bool, test: EvalSet | None) -> list[Dish]:
    """Every requested method's soup, scored on test as it would ship. A compared method that
    cannot cook is reported with its reason; the chosen one failing fails the step."""
    dishes = []
    for name in opts.methods():
        before = (scorer.images_scored, scorer.recalibration_images)
        try:
            result = METHODS[name](kitchen_for(), **opts.method_params)
        except SoupsError as e:
            if name == opts.method:
                raise
            dishes.append(Dish(name, None, error=" ".join(str(e).split())))
            continue
        work = (scorer.images_scored - before[0], scorer.recalibration_images - before[1])
        # The soup that ships is the one that was scored: averaged weights with the BatchNorm
        # statistics recomputed on training images (when recalibration is on).
        state = result.state_dict
        if result.averaged and recal:
            state = {k: v.detach().clone() for k, v in scorer.load(state, averaged=True).state_dict().items()}
        accuracy = metrics(scorer.logits(state, test, False), test.labels)["accuracy"] if test else None
        dishes.append(Dish(name, result, state, accuracy, work=work))
        log.info("%s soup: val %.4f, %d ingredient(s)", name, result.accuracy, len(result.ingredients))
    return dishes


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


def make_soup(
    recipe: Recipe, given: dict, opts: SoupOptions, registered_model: str | None = None
) -> SoupReport:
    """Rank, cook and register a soup from the finished ingredient runs of an experiment.
    `given` holds the data options the user passed explicitly (they beat the runs' params)."""
    chosen = method(opts.method)
    opts.methods()  # every compared name is a method: fail before any work
    params = chosen.resolve(opts.method_params)
    checked(opts)
    with tracking.start_step("soup", recipe, f"{opts.method} soup") as run:
        g = gather(run, recipe, given, opts)
        run.log_split(g.splits.fingerprint)
        run.log_datasets(data_parts(g.ref, g.splits, ("validation", "test")))
        num_classes = tracking.classes_of(g.top)
        model = create_model(g.ref.model, num_classes)
        mean, std = normalisation(model)
        recal = opts.bn_recalibrate == "on" or (opts.bn_recalibrate == "auto" and has_batchnorm(model))
        val, test, bn = held_out_sets(g.splits, g.ref, num_classes, opts.bn_images if recal else None)
        scorer = Scorer(model, val, mean, std, 2 * g.ref.batch_size, default_device(), bn)
        ingredients = Ingredients(g.runs, g.top)
        start = functools.cache(lambda: start_weights(g.top, g.ref, num_classes))
        log.info("%s soup over %d candidate runs, held-out %d images", opts.method, len(g.runs), len(val))
        dishes = cook_all(opts, lambda: Kitchen(ingredients.candidates(), scorer, start), scorer, recal, test)
        report = _report(run, g, opts, params, dishes, ingredients, scorer, test, dishes[0].work)
        name = registered_model or registered_name(
            dataclasses.replace(g.ref, registered_model=recipe.registered_model)
        )
        publish(run, report, g, ingredients.meta, len(val), name)
    return report


def _report(run, g: Gathered, opts, params, dishes, ingredients, scorer, test, scored) -> SoupReport:
    result = dishes[0].result
    by_id = {r.info.run_id: r for r in g.runs}
    usable = [s.name for s in result.steps if s.status != "skipped"]
    # Each usable ingredient's own test score: the one `evaluate` logged into its run (same split,
    # so the same images), else scored here, reloaded one at a time from the cache.
    own_test = {}
    for name in usable:
        logged = tracking.test_score(by_id[name])
        if logged is None and test is not None:
            state = ingredients.load(by_id[name])
            logged = metrics(scorer.logits(state, test, False), test.labels)["accuracy"]
        own_test[name] = logged
    best_id = next(s.name for s in result.steps if s.status != "skipped")
    return SoupReport(
        run.id,
        opts.method,
        {**options.params(opts), **params},
        dishes,
        tracking.rank_score(by_id[best_id]),
        own_test[best_id],
        len(g.runs),
        len(usable),
        scored[0],
        len(usable) * scorer.size,
        scored[1],
        ingredients.downloaded,
        ingredient_table(result.steps, by_id, own_test, result.held_out),
    )
