"""The soup step: ranked ingredient runs in; a soup run, its checkpoint and a registered model
version out. The selection reads only the val split; test is only reported.

gather (rank runs, rebuild the split) -> cook (the chosen method, then the ones compared with it)
-> report (tables, figures) -> publish (the soup run, its checkpoint, the registry)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field

from soups import SoupsError, options, tracking
from soups.evaluate import EvalSet, Scorer, default_device, has_batchnorm
from soups.models import create_model, load_checkpoint, normalisation
from soups.options import checked, option
from soups.recipe import Recipe, load_splits, registered_name
from soups.run_notes import data_parts, rebuilt
from soups.score_book import ScoreBook
from soups.soup import METHODS, Kitchen, method
from soups.steps.soup.ingredients import Gathered, Ingredients, held_out_sets, start_weights
from soups.steps.soup.publish import publish
from soups.steps.soup.report import BASELINE, Dish, SoupReport, assemble, best_ingredient, history_of, shipped

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
    continue_from: str = option(
        "auto",
        "The soup this one continues: its held-out scores are reused, only candidate soups it never "
        "scored are scored, and the result is what starting over gives (greedy continues; uniform "
        "joins the new runs to its mean, scored once; wise_ft, model_stock and learned recompute). "
        "auto: the registered model's champion when it was made on this split from this start; "
        "none: start over; models:/<name>@<alias>, models:/<name>/<version> or a soup run id.",
        cli="from",
    )
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


def gather(run: tracking.Run, recipe: Recipe, given: dict, opts: SoupOptions, split: str) -> Gathered:
    """The ranked candidate runs, the best of them on the recipe's held-out split (`split`, its
    fingerprint) and that split rebuilt from its params. Runs of other splits stay candidates, to
    be listed as left out: a stray run on another split never decides the soup's split."""
    source = tracking.experiment_or_own(opts.source, run)
    extra = " and ".join(c for c in (opts.filter, tracking.parent_filter(opts.parent)) if c)
    runs = tracking.ranked_ingredients(source, extra or None, opts.max_candidates)
    where = f" matching {extra!r}" if extra else ""
    if not runs:
        raise SoupsError(f"no finished ingredient runs in experiment {source}{where}: run finetune first")
    top = next((r for r in runs if tracking.split_of(r) == split), None)
    if top is None:
        found = Counter(tracking.split_of(r) for r in runs)
        raise SoupsError(
            f"none of the {len(runs)} finished ingredient runs in experiment {source}{where} is on this "
            f"recipe's split {split} (data={recipe.data}, split_seed={recipe.split_seed}); they are on "
            + ", ".join(f"{s} ({n} runs)" for s, n in found.most_common(3))
            + ": pass the recipe and data options they were trained with"
        )
    ref, splits = rebuilt(top, given)
    return Gathered(runs, top, ref, splits, extra)


def cook_all(opts: SoupOptions, kitchen_for, scorer: Scorer, recal: bool, test: EvalSet | None) -> list[Dish]:
    """Every requested method's soup, scored on test as it would ship. A compared method that
    cannot cook is reported with its reason; the chosen one failing fails the step."""
    dishes = []
    for name in opts.methods():
        before = (scorer.images_scored, scorer.recalibration_images, scorer.models_scored)
        try:
            result = METHODS[name](kitchen_for(), **opts.method_params)
        except SoupsError as e:
            if name == opts.method:
                raise
            dishes.append(Dish(name, None, error=" ".join(str(e).split())))
            continue
        work = (
            scorer.images_scored - before[0],
            scorer.recalibration_images - before[1],
            scorer.models_scored - before[2],
        )
        state, correct = shipped(result.state_dict, scorer, recal, test)
        dishes.append(Dish(name, result, state, correct, work=work))
        log.info("%s soup: val %.4f, %d ingredient(s)", name, result.accuracy, len(result.ingredients))
    return dishes


def make_soup(
    recipe: Recipe, given: dict, opts: SoupOptions, registered_model: str | None = None
) -> SoupReport:
    """Rank, cook and register a soup from the finished ingredient runs of an experiment, on the
    recipe's held-out split. `given` holds the data options the user passed explicitly (they beat
    the runs' params)."""
    chosen = method(opts.method)
    opts.methods()  # every compared name is a method: fail before any work
    params = chosen.resolve(opts.method_params)
    checked(opts)
    for name in filter(None, (registered_model, recipe.registered_model)):  # searched for when promoted
        try:
            tracking.quote(name)
        except SoupsError:
            raise SoupsError(
                f"registered_model={name!r}: quotes, backslashes and control characters are refused"
            ) from None
    split = load_splits(recipe).fingerprint  # a wrong data folder fails before any run exists
    with tracking.start_step("soup", recipe, f"{opts.method} soup") as run:
        g = gather(run, recipe, given, opts, split)
        run.log_split(g.splits.fingerprint)
        run.log_start(tracking.start_of(g.top) or "", tracking.start_run_of(g.top) or "")
        run.log_datasets(data_parts(g.ref, g.splits, ("validation", "test")))
        name = registered_model or registered_name(
            dataclasses.replace(g.ref, registered_model=recipe.registered_model)
        )
        earlier = tracking.earlier_soup(opts.continue_from, name, split, tracking.start_of(g.top) or "")
        log.info("%s", f"continuing soup run {earlier.run_id}" if earlier.run_id else earlier.why)
        num_classes = tracking.classes_of(g.top)
        model = create_model(g.ref.model, num_classes)
        mean, std = normalisation(model)
        recal = opts.bn_recalibrate == "on" or (opts.bn_recalibrate == "auto" and has_batchnorm(model))
        val, test, bn = held_out_sets(g.splits, g.ref, num_classes, opts.bn_images if recal else None)
        book = ScoreBook.from_json(earlier.book)
        scorer = Scorer(model, val, mean, std, 2 * g.ref.batch_size, default_device(), bn, book)
        ingredients = Ingredients(g.runs, g.top)
        start = functools.cache(lambda: start_weights(g.top, g.ref, num_classes))
        log.info("%s soup over %d candidate runs, held-out %d images", opts.method, len(g.runs), len(val))
        dishes = cook_all(opts, lambda: Kitchen(ingredients.candidates(), scorer, start), scorer, recal, test)
        best = best_ingredient(dishes[0].result, ingredients, g.runs, scorer, recal, test)
        params = {**options.params(opts), **params}
        report = assemble(run.id, g.runs, params, dishes, best, ingredients, scorer, test)
        report.add_history(history_of(earlier, g.runs, scorer))
        # Scored when this soup's turn to be compared comes (tracking.promote): by then another
        # soup step may have moved the alias.
        judge = functools.partial(champion_score, name, g.splits.fingerprint, dishes[0], scorer)
        publish(run, report, g, ingredients.meta, judge, name, book.to_json())
    return report


def soup_for_sweep(recipe: Recipe, data_options: dict, parent: str, continue_from: str) -> tuple[str, str]:
    """A soup of a sweep's children with the defaults (what `sweep -P soup=` makes)."""
    report = make_soup(recipe, data_options, SoupOptions(parent=parent, continue_from=continue_from))
    return report.run_id, f"soup run {report.run_id} of {len(report.table)} trial runs; {report.registry}"


def champion_score(name: str, split: str, chosen: Dish, scorer: Scorer) -> tracking.Rival | None:
    """The current champion scored here, on the very images the chosen soup was scored on, with
    the same BatchNorm treatment: the alias moves on a like-with-like comparison only. None when
    there is no champion yet."""
    champ = tracking.champion(name)
    if champ is None:
        return None
    where = f"{name}@{tracking.CHAMPION} (version {champ.version})"
    run = tracking.get_run(champ.run_id) if champ.run_id else None
    if run is None or tracking.split_of(run) != split:
        theirs = tracking.split_of(run) if run else "unknown"
        return tracking.Rival(
            champ.version, None, f"{where} was made on split {theirs}, this soup on {split}"
        )
    try:
        state = load_checkpoint(tracking.cached_checkpoint(run)[0]).state_dict
        on = scorer if chosen.result.scored_on is None else scorer.subset(chosen.result.scored_on)
        return tracking.Rival(champ.version, on.correct(state) / on.size, "")
    except (SoupsError, RuntimeError) as e:  # another architecture under the same name, or gone
        return tracking.Rival(champ.version, None, f"{where} cannot be scored here: {str(e).splitlines()[0]}")
