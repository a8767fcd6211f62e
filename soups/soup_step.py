"""The greedy_soup step: ranked ingredient runs in; a soup run, its checkpoint and a registered
model version out. The selection reads only the val split; test is only reported."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from soups import SoupsError, data, plots, tracking
from soups.evaluate import EvalSet, Scorer, default_device, has_batchnorm, metrics
from soups.models import Checkpoint, create_model, load_checkpoint, normalisation, save_checkpoint
from soups.recipe import Recipe, from_params
from soups.soup import SOUP_METHODS, TIE_RULES, Candidate

log = logging.getLogger(__name__)
BN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class SoupOptions:
    method: str = "greedy"
    tie: str = "ge"
    bn_recalibrate: str = "auto"
    bn_images: int = 1000
    max_candidates: int = 0
    filter: str = ""
    parent: str = ""
    source: str = ""  # experiment to take ingredients from; default: the soup run's own


@dataclass
class SoupReport:
    run_id: str
    method: str
    tie: str
    filter: str
    bn_recalibrate: bool
    candidates: int
    n_ingredients: int
    n_usable: int
    val_accuracy: float
    test_accuracy: float | None
    uniform_val_accuracy: float | None
    uniform_test_accuracy: float | None
    best_val_accuracy: float
    best_test_accuracy: float | None
    images_scored: int
    images_full: int
    downloaded: int
    curve: list[tuple[int, float]]
    table: pd.DataFrame
    registry: str = ""


def _incompatible(run, top) -> str | None:
    """Why `run` cannot join a soup started from the top-ranked run, judged from what it logged."""
    mine, ref = run.data.params, top.data.params
    for key in ("model", "num_classes"):
        if mine.get(key) != ref.get(key):
            return f"incompatible: {key} {mine.get(key)} differs from the top run's {ref.get(key)}"
    split, top_split = tracking.split_of(run), tracking.split_of(top)
    if split != top_split:
        return f"incompatible: split {split} differs from the top run's {top_split}"
    return None


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


def _held_out(splits: data.Splits, recipe: Recipe, num_classes: int, bn_images: int | None):
    decode = partial(data.decode, size=recipe.img_size, workers=recipe.workers)
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


def make_soup(
    recipe: Recipe, given: dict, opts: SoupOptions, registered_model: str | None = None
) -> SoupReport:
    """Rank, cook and register a soup from the finished ingredient runs of an experiment.
    `given` holds the data options the user passed explicitly (they beat the runs' params)."""
    if opts.method not in SOUP_METHODS:
        raise SoupsError(f"method={opts.method!r} must be one of {', '.join(SOUP_METHODS)}")
    if opts.tie not in TIE_RULES:
        raise SoupsError(f"tie={opts.tie!r} must be one of {', '.join(TIE_RULES)}")
    if opts.bn_recalibrate not in BN_MODES:
        raise SoupsError(f"bn_recalibrate={opts.bn_recalibrate!r} must be one of {', '.join(BN_MODES)}")
    with tracking.start("soup", recipe.experiment) as run:
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
        run.log_split(splits.fingerprint)
        num_classes = int(top.data.params["num_classes"])
        model = create_model(ref.model, num_classes)
        mean, std = normalisation(model)
        recal = opts.bn_recalibrate == "on" or (opts.bn_recalibrate == "auto" and has_batchnorm(model))
        val, test, bn = _held_out(splits, ref, num_classes, opts.bn_images if recal else None)
        scorer = Scorer(model, val, mean, std, 2 * ref.batch_size, default_device(), bn)
        ingredients = Ingredients(runs, top)
        log.info("%s soup over %d candidate runs, held-out %d images", opts.method, len(runs), len(val))
        result = SOUP_METHODS[opts.method](ingredients.candidates(), scorer.correct, len(val), opts.tie)
        scored = scorer.images_scored  # selection ends here: everything below only reports

        def test_accuracy(state, averaged: bool) -> float | None:
            return metrics(scorer.logits(state, test, averaged), test.labels)["accuracy"] if test else None

        by_id = {r.info.run_id: r for r in runs}
        usable = [s.name for s in result.steps if s.status != "skipped"]
        # Each usable ingredient's own test score, reloaded one at a time from the cache; without
        # a test split there is nothing to read them for.
        own_test = {n: test_accuracy(ingredients.load(by_id[n]), False) if test else None for n in usable}
        best_id = result.ingredients[0]
        # The soup that ships is the one that was scored: averaged weights with the BatchNorm
        # statistics recomputed on training images (when recalibration is on).
        final = result.state_dict
        if len(result.ingredients) > 1 and recal:
            final = {k: v.detach().clone() for k, v in scorer.load(final, averaged=True).state_dict().items()}
        uniform_val = scorer.correct(result.uniform, None, True) / len(val) if result.uniform else None
        table = pd.DataFrame(
            [
                {
                    "rank": s.rank,
                    "run_id": s.name,
                    "i": by_id[s.name].data.params.get("i"),
                    "val_accuracy": tracking.rank_score(by_id[s.name]),
                    "test_accuracy": own_test.get(s.name),
                    "status": s.status,
                    "reason": s.reason,
                    "soup_val_accuracy": None if s.soup_correct is None else s.soup_correct / len(val),
                }
                for s in result.steps
            ]
        )
        report = SoupReport(
            run.id,
            opts.method,
            opts.tie,
            extra,
            recal,
            len(runs),
            len(result.ingredients),
            len(own_test),
            result.correct / len(val),
            test_accuracy(final, False),
            uniform_val,
            test_accuracy(result.uniform, True) if result.uniform else None,
            result.best_correct / len(val),
            own_test[best_id],
            scored,
            len(own_test) * len(val),
            ingredients.downloaded,
            [(s.rank, s.soup_correct / len(val)) for s in result.steps if s.soup_correct is not None],
            table,
        )
        run.log_soup(report)
        run.log_figure(
            plots.greedy_curve(result.steps, len(val), list(table.val_accuracy), uniform_val),
            tracking.GREEDY_CURVE,
        )
        soups_marked = {f"{opts.method} soup": (report.val_accuracy, report.test_accuracy)}
        if uniform_val is not None:
            soups_marked["uniform soup"] = (uniform_val, report.uniform_test_accuracy)
        if test is not None:
            points = [
                (v, t) for v, t in zip(table.val_accuracy, table.test_accuracy, strict=True) if t is not None
            ]
            run.log_figure(plots.val_vs_test(points, soups_marked), tracking.VAL_VS_TEST)
        meta = ingredients.meta
        soup = Checkpoint(
            final,
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
            name = registered_model or recipe.registered_model
            version, report.registry = run.register(path, name, report.val_accuracy, splits.fingerprint)
        log.info("registered %s version %d; %s", name, version, report.registry)
    return report
