"""The soup step: ranked ingredient runs in; a soup run, its checkpoint and a registered model
version out. The selection reads only the val split; test is only reported.

gather (rank runs, rebuild the split) -> cook (the chosen method, then the ones compared with it)
-> report (tables, figures) -> publish (the soup run, its checkpoint, the registry)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from soups import SoupsError, data, plots, tracking
from soups.evaluate import EvalSet, Scorer, default_device, has_batchnorm, metrics
from soups.finetune import data_parts
from soups.models import (
    Checkpoint,
    create_model,
    load_checkpoint,
    normalisation,
    save_checkpoint,
    weights_digest,
)
from soups.recipe import Recipe, from_params, registered_name
from soups.soup import METHODS, Candidate, Kitchen, SoupResult, StateDict, method

log = logging.getLogger(__name__)
BN_MODES = ("auto", "on", "off")
BASELINE = "uniform"  # always reported beside the chosen method


@dataclass(frozen=True)
class SoupOptions:
    method: str = "greedy"
    compare: str = ""  # other methods to cook and report side by side: names, comma-separated, or all
    method_params: dict = field(default_factory=dict)  # any registered method's parameters, by name
    bn_recalibrate: str = "auto"
    bn_images: int = 1000
    max_candidates: int = 0
    filter: str = ""
    parent: str = ""
    source: str = ""  # experiment to take ingredients from; default: the soup run's own

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


def _incompatible(run, top) -> str | None:
    """Why `run` cannot join a soup started from the top-ranked run, judged from what it logged."""
    mine, ref = run.data.params, top.data.params
    for key in ("model", "num_classes"):
        if mine.get(key) != ref.get(key):
            return f"incompatible: {key} {mine.get(key)} differs from the top run's {ref.get(key)}"
    split, top_split = tracking.split_of(run), tracking.split_of(top)
    if split != top_split:
        return f"incompatible: split {split} differs from the top run's {top_split}"
    start, top_start = tracking.start_of(run), tracking.start_of(top)
    if start is None:
        return f"no {tracking.START} tag: its starting weights are unknown; fine-tune it again to use it"
    if start != top_start:
        return (
            f"incompatible: started from weights {start[:12]}… ({_start_name(run)}), the top run from "
            f"{(top_start or '?')[:12]}… ({_start_name(top)}): averaging fine-tunes of different starts "
            "lands between basins"
        )
    return None


def _start_name(run) -> str:
    start_run = tracking.start_run_of(run)
    return f"start run {start_run}" if start_run else f"pretrained={run.data.params.get('pretrained')}"


class Ingredients:
    """Loads ranked runs' checkpoints lazily, one at a time, through the on-disk cache."""

    def __init__(self, runs: list, top):
        self.runs, self.top, self.downloaded = runs, top, 0
        self.meta: Checkpoint | None = None

    def load(self, run) -> dict:
        if reason := _incompatible(run, self.top):
            raise SoupsError(reason)
        path, fresh = tracking.cached_checkpoint(run)
        self.downloaded += fresh
        ckpt = load_checkpoint(path)
        if ckpt.model != self.top.data.params.get("model") or ckpt.split != tracking.split_of(self.top):
            raise SoupsError(f"checkpoint of run {run.info.run_id} disagrees with its run's params and tags")
        if self.meta is None:
            self.meta = Checkpoint(
                {}, ckpt.model, ckpt.num_classes, ckpt.classes, ckpt.img_size, ckpt.split, ckpt.mean, ckpt.std
            )
        return ckpt.state_dict

    def candidates(self):
        return (Candidate(r.info.run_id, partial(self.load, r)) for r in self.runs)


def start_weights(top, ref: Recipe, num_classes: int) -> StateDict:
    """The exact weights the ingredients started from, checked against their `soups.start` tag: the
    start run's checkpoint, or the pretrained weights rebuilt as `finetune` built them."""
    expected, start_run = tracking.start_of(top), tracking.start_run_of(top)
    if start_run:
        try:
            state = load_checkpoint(tracking.cached_checkpoint(tracking.get_run(start_run))[0]).state_dict
        except SoupsError as e:
            raise SoupsError(f"start run {start_run} of the ingredients: {e}") from None
        where = f"start run {start_run}"
    else:
        pretrained = ref.pretrained
        if tracking.is_mlflow_uri(pretrained):
            pretrained = str(tracking.checkpoint_for(pretrained))
        state = create_model(ref.model, num_classes, pretrained).state_dict()
        where = f"pretrained={ref.pretrained} rebuilt here"
    if weights_digest(state) != expected:
        raise SoupsError(
            f"the start weights ({where}) have digest {weights_digest(state)[:12]}…, the ingredients "
            f"started from {(expected or '?')[:12]}…: the start is not available as it was"
        )
    return state


def held_out_sets(splits: data.Splits, recipe: Recipe, num_classes: int, bn_images: int | None):
    """val and test decoded once, and `bn_images` training images (0: all; None: none) to
    recompute BatchNorm statistics of averaged weights."""
    # skip_bad as the ingredients had it: their val_accuracy left the same unreadable images out.
    decode = partial(data.decode, size=recipe.img_size, workers=recipe.workers, skip_bad=recipe.skip_bad)
    val = EvalSet.from_decoded(decode(splits.val, desc="decode val"), num_classes)
    test = (
        EvalSet.from_decoded(decode(splits.test, desc="decode test"), num_classes)
        if len(splits.test)
        else None
    )
    bn = None
    if bn_images is not None:
        train = splits.train
        if bn_images and len(train) > bn_images:
            train = train.subset(
                np.sort(np.random.default_rng(0).choice(len(train), bn_images, replace=False))
            )
        bn = EvalSet.from_decoded(decode(train, desc="decode train (BatchNorm)"), num_classes)
    return val, test, bn


@dataclass
class Gathered:
    runs: list
    top: object
    ref: Recipe
    splits: data.Splits
    filter: str


def gather(run: tracking.Run, recipe: Recipe, given: dict, opts: SoupOptions) -> Gathered:
    """The ranked candidate runs and the held-out split rebuilt from the top run's params."""
    source = tracking.find_experiment(opts.source) if opts.source else run.experiment_id
    extra = " and ".join(c for c in (opts.filter, tracking.parent_filter(opts.parent)) if c)
    runs = tracking.ranked_ingredients(source, extra or None, opts.max_candidates)
    if not runs:
        where = f" matching {extra!r}" if extra else ""
        raise SoupsError(f"no finished ingredient runs in experiment {source}{where}: run finetune first")
    top = runs[0]
    ref = from_params(tracking.run_params(top), given)
    splits = data.load_splits(ref)
    if splits.fingerprint != tracking.split_of(top):
        raise SoupsError(
            f"the held-out split rebuilt from run {top.info.run_id}'s params (data={ref.data}) has "
            f"fingerprint {splits.fingerprint}, the run recorded {tracking.split_of(top)}: "
            "pass -P data=<folder> where that run's data lives"
        )
    return Gathered(runs, top, ref, splits, extra)


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
                "i": by_id[s.name].data.params.get("i"),
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
    if opts.bn_recalibrate not in BN_MODES:
        raise SoupsError(f"bn_recalibrate={opts.bn_recalibrate!r} must be one of {', '.join(BN_MODES)}")
    with tracking.start_step("soup", recipe, f"{opts.method} soup") as run:
        g = gather(run, recipe, given, opts)
        run.log_split(g.splits.fingerprint)
        run.log_datasets(data_parts(g.ref, g.splits, ("validation", "test")))
        num_classes = int(g.top.data.params["num_classes"])
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
        _publish(run, report, g, ingredients.meta, len(val), name)
    return report


def _report(run, g: Gathered, opts, params, dishes, ingredients, scorer, test, scored) -> SoupReport:
    result = dishes[0].result
    by_id = {r.info.run_id: r for r in g.runs}
    usable = [s.name for s in result.steps if s.status != "skipped"]
    # Each usable ingredient's own test score: the one `evaluate` logged into its run (same split,
    # so the same images), else scored here, reloaded one at a time from the cache.
    own_test = {}
    for name in usable:
        logged = by_id[name].data.metrics.get("test_accuracy")
        if logged is None and test is not None:
            state = ingredients.load(by_id[name])
            logged = metrics(scorer.logits(state, test, False), test.labels)["accuracy"]
        own_test[name] = logged
    best_id = next(s.name for s in result.steps if s.status != "skipped")
    return SoupReport(
        run.id,
        opts.method,
        {
            "method": opts.method,
            **params,
            "compare": ",".join(d.method for d in dishes[1:]),
            "rank_by": tracking.RANK_METRIC,
            "candidates": len(g.runs),
            "bn_recalibrate": scorer.bn_images is not None,
            "filter": g.filter,
        },
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


def soup_name(report: SoupReport) -> str:
    """`greedy soup 2/4 (+0.40 val)`: method, ingredients kept of usable, val gain in points."""
    chosen = report.chosen
    gain = 100 * (chosen.val_accuracy - report.best_val_accuracy)
    return f"{report.method} soup {chosen.n_ingredients}/{report.n_usable} ({gain:+.2f} val)"


def soup_note(report: SoupReport, g: Gathered, experiment_id: str) -> str:
    """The soup run's description: method, start, each ingredient with its link, score and the
    decision, and the result beside the best ingredient and the other methods."""
    method_ = METHODS[report.method]
    start_run = tracking.start_run_of(g.top)
    start = (
        tracking.run_link(start_run, experiment_id, f"start run {start_run[:8]}")
        if start_run
        else f"the pretrained weights (`{g.ref.pretrained}`)"
    )
    rows = [
        f"| {row['rank']} | {tracking.run_link(row['run_id'], g.top.info.experiment_id)} | {row['i']} | "
        f"{pct(row['val_accuracy'])} | {pct(row['soup_val_accuracy'])} | {row['status']} | {row['reason']} |"
        for row in report.table.to_dict("records")
    ]
    others = [
        f"| {d.method} | {pct(d.val_accuracy)} | {pct(d.test_accuracy)} | {d.n_ingredients} |"
        for d in report.dishes
    ]
    return "\n".join(
        [
            f"**{report.method} soup** ({method_.paper}) of {report.n_usable} usable ingredients, "
            f"{report.chosen.n_ingredients} kept; they started from {start}, weights "
            f"`{(tracking.start_of(g.top) or '?')[:12]}`; split `{g.splits.fingerprint}`.",
            "",
            "| rank | run | i | val | soup val after it | decision | why |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Best ingredient: val {pct(report.best_val_accuracy)}, test {pct(report.best_test_accuracy)}.",
            "",
            "| method | val | test | ingredients |",
            "| --- | --- | --- | --- |",
            *others,
        ]
    )


def pct(x) -> str:
    return "-" if x is None or pd.isna(x) else f"{100 * x:.2f}%"


def _publish(run, report: SoupReport, g: Gathered, meta: Checkpoint, held_out: int, name: str) -> None:
    run.log_soup(report)
    run.rename(soup_name(report))
    run.describe(soup_note(report, g, run.experiment_id))
    chosen = report.chosen
    uniform = next((d for d in report.dishes if d.method == BASELINE and d.n_ingredients > 1), None)
    run.log_figure(
        plots.soup_curve(
            chosen.result,
            METHODS[chosen.method].curve_x,
            list(report.table.val_accuracy),
            uniform.val_accuracy if uniform else None,
        ),
        tracking.SOUP_CURVE,
    )
    if report.best_test_accuracy is not None:
        points = [
            (v, t)
            for v, t in zip(report.table.val_accuracy, report.table.test_accuracy, strict=True)
            if t is not None and not pd.isna(t)
        ]
        marked = {f"{d.method} soup": (d.val_accuracy, d.test_accuracy) for d in report.dishes if d.result}
        run.log_figure(plots.val_vs_test(points, marked), tracking.VAL_VS_TEST)
    soup = Checkpoint(
        chosen.state,
        meta.model,
        meta.num_classes,
        meta.classes,
        meta.img_size,
        meta.split,
        meta.mean,
        meta.std,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        run.log_checkpoint(path, save_checkpoint(soup, path))
        lineage = {
            "soups.soup_run": run.id,
            "soups.method": report.method,
            "soups.ingredients": ",".join(chosen.result.ingredients),
            "soups.start": tracking.start_of(g.top) or "",
            "soups.start_run": tracking.start_run_of(g.top) or "",
            "soups.split": g.splits.fingerprint,
            "val_accuracy": f"{chosen.val_accuracy:.4f}",
            "test_accuracy": "" if chosen.test_accuracy is None else f"{chosen.test_accuracy:.4f}",
        }
        note = (
            f"{soup_name(report)} from "
            f"{tracking.run_link(run.id, run.experiment_id, 'soup run ' + run.id[:8])}: "
            f"val {pct(chosen.val_accuracy)}, test {pct(chosen.test_accuracy)} (best ingredient "
            f"{pct(report.best_val_accuracy)} / {pct(report.best_test_accuracy)}). Ingredients: "
            + ", ".join(tracking.run_link(r, g.top.info.experiment_id) for r in chosen.result.ingredients)
        )
        version, report.registry = run.register(
            path, name, chosen.val_accuracy, g.splits.fingerprint, lineage, note
        )
    log.info("registered %s version %d; %s", name, version, report.registry)
