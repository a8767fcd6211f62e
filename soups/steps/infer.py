"""The infer step: predictions from a registered soup (or any checkpoint), optionally next to an
ensemble of other models, written as the competition's submission or a plain CSV."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from soups import SoupsError, data, layouts, options, tracking
from soups.ensemble import VOTES, attribute_vote, hard_vote, soft_vote
from soups.evaluate import default_device
from soups.models import Checkpoint, load_checkpoint
from soups.options import checked, option
from soups.predictions import (
    Pixels,
    Prediction,
    predict_member,
    score,
    submission,
    vote_on_files,
    write_atomically,
)
from soups.recipe import Recipe, load_splits, registered_name
from soups.run_notes import data_part, rebuilt

log = logging.getLogger(__name__)
TTA = ("none", "hflip")


@dataclass(frozen=True)
class InferOptions:
    model_uri: str = option(
        "",
        "models:/<name>@<alias>, models:/<name>/<version>, runs:/<id> or a .pt file "
        "[default: models:/<registered_model>@champion].",
    )
    ensemble: str = option(
        "",
        "Also predict with an ensemble: comma-separated model URIs, or top:N for the N best "
        "ingredient runs of the experiment.",
    )
    weights: str = option(
        "", "Ensemble weights: empty for equal, val for each member's val_accuracy, or one number per member."
    )
    vote: str = option(
        "soft",
        "soft: mean of probabilities; hard: majority label (ties: best member); attributes: majority "
        "per attribute of layouts that have them (mask: mask / gender / age).",
        choices=list(VOTES),
    )
    tta: str = option(
        "none",
        "Test-time augmentation: hflip averages the probabilities of the image and its mirror.",
        choices=TTA,
    )
    probs: bool = option(False, "Add one probability column per class (not for the mask submission).")
    whole_folder: bool = option(
        False,
        "Predict every image under --data instead of the model's test split (or the layout's own "
        "inputs: mask's eval/); not scored, as the folder may hold images the model trained on.",
    )
    output: str = option("", "Also write predictions.csv here.")
    vote_files: str = option(
        "",
        "Instead of predicting: hard-vote (or vote=attributes) these comma-separated predictions.csv "
        "files, best first.",
    )


def ensemble_members(spec: str, experiment_id: str, split: str) -> list[str]:  # top:N: of `split`
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise SoupsError(f"ensemble={spec!r}: use top:<number>") from None
        runs = tracking.ranked_ingredients(experiment_id, tracking.split_filter(split), limit=n)
        if not runs:
            raise SoupsError(
                f"ensemble={spec}: no finished ingredient run of split {split} in {experiment_id}"
            )
        return [f"runs:/{r.info.run_id}" for r in runs]
    return [u.strip() for u in spec.split(",") if u.strip()]


def member_weights(spec: str, uris: list[str]) -> list[float] | None:
    if not spec:
        return None
    if spec == "val":
        return [tracking.val_accuracy_of(u) for u in uris]
    try:
        return [float(w) for w in spec.split(",")]
    except ValueError:
        raise SoupsError(f"weights={spec!r}: use val or one number per ensemble member") from None


@dataclass(frozen=True)
class Inputs:
    """What infer predicts: the images, which part of the data they are, and the recipe of that
    data (for the test split, the model's own). Only the test split is scored: a number called
    test is measured on images no model of the run trained or was chosen on."""

    samples: data.Samples
    part: str  # test | inference (a layout's own, unlabelled: mask's eval/) | folder (every image)
    recipe: Recipe

    @property
    def what(self) -> str:
        return {
            "test": "the test split of the data the model was trained on",
            "inference": f"the {self.recipe.layout} layout's own inputs",
            "folder": f"every image under {self.recipe.data} (not scored: it may hold training images)",
        }[self.part]


def inputs_for(recipe: Recipe, given: dict, opts: InferOptions, model_uri: str, main: Checkpoint) -> Inputs:
    """Every image under data when asked; else the layout's own inputs; else the model's test split."""
    if opts.whole_folder:
        return Inputs(layouts.every_image(recipe.data, main.classes), "folder", recipe)
    own = layouts.inference_inputs(recipe.layout, recipe.data, main.classes)
    if own is not None:
        return Inputs(own, "inference", recipe)
    model_recipe, test = model_test_split(model_uri, main, recipe, given)
    return Inputs(test, "test", model_recipe)


def training_run(model_uri: str):
    """The run whose params hold the model's data options: its own run, or for a registered soup
    its first ingredient's (a soup's ingredients share one split; the soup run logs no data
    options). None for a checkpoint file, or a soup run given as runs:/ (no lineage to follow)."""
    run = tracking.run_of(model_uri)
    if run is None or tracking.role_of(run) != "soup":
        return run
    if not model_uri.startswith("models:/"):
        return None
    first = tracking.model_version(model_uri).tags.get(tracking.INGREDIENT_RUNS, "").split(",")[0]
    return tracking.get_run(first) if first else None


def model_test_split(model_uri: str, ckpt: Checkpoint, recipe: Recipe, given: dict):
    """The model's recipe and its test split, rebuilt as `evaluate` rebuilds it: from the params
    of the run that trained it, else from `recipe`; either way checked against the split the
    checkpoint records. The recipe's max_test may take fewer of it."""
    run = training_run(model_uri)
    model_recipe, splits = rebuilt(run, given) if run is not None else (recipe, load_splits(recipe))
    if splits.fingerprint != ckpt.split:
        raise SoupsError(
            f"{model_uri} was trained on split {ckpt.split}, the data at {model_recipe.data} splits as "
            f"{splits.fingerprint}: give the data and split options it was trained with (val_ratio, "
            "test_ratio, split_seed, max_*), or whole_folder=true to predict every image, unscored"
        )
    if not len(splits.test):
        raise SoupsError(
            f"{model_uri}: its data at {model_recipe.data} has no test split (test_ratio 0 and no test "
            "part): nothing it never saw to score; pass whole_folder=true to predict every image, unscored"
        )
    return model_recipe, data.capped(splits.test, recipe.max_test, model_recipe.split_seed + 2)


def inference_note(model_uri: str, results: dict, inputs: Inputs, unreadable: int, opts: InferOptions) -> str:
    """The inference run's description: which model (and ensemble) predicted what, how well."""
    lines = [
        f"**Predictions** for {len(inputs.samples)} images ({unreadable} unreadable), {inputs.what}, "
        f"with `{model_uri}`"
    ]
    lines[0] += f", beside a {opts.vote} vote of `{opts.ensemble}`." if opts.ensemble else "."
    lines += ["", "| predictor | accuracy | macro F1 | ms / image |", "| --- | --- | --- | --- |"]
    for key, p in results.items():
        acc = "-" if p.accuracy is None else f"{100 * p.accuracy:.2f}%"
        f1 = "-" if p.f1 is None else f"{p.f1:.4f}"
        lines.append(f"| {key}: {p.name} | {acc} | {f1} | {1000 * p.seconds_per_image:.2f} |")
    return "\n".join(lines)


@dataclass
class InferResult:
    """What one `infer` did: its run, each predictor's scores, the submission it wrote, and what
    the model's soup run recorded (for the table beside it)."""

    run_id: str
    results: dict[str, Prediction]
    frame: pd.DataFrame
    skipped: list[str]
    output: str
    soup_run: dict[str, float]
    part: str = ""  # which images: `Inputs.part`
    what: str = ""  # ... in words

    @property
    def rows(self) -> int:
        return len(self.frame)


def infer(recipe: Recipe, opts: InferOptions, given: dict | None = None) -> InferResult:
    """Predict the model's test split (or the layout's own inputs, or every image) with
    `model_uri` (and the ensemble, if any); log an inference run with predictions.csv. `given`
    holds the data options the user passed explicitly (they beat the model's run's params).
    Returns what to print."""
    checked(opts)
    attributes = layouts.get(recipe.layout).attributes
    if opts.vote == "attributes" and attributes is None:
        having = " or ".join(k for k, v in layouts.LAYOUTS.items() if v.attributes)
        raise SoupsError(
            f"vote=attributes needs the {having} layout (labels that combine attributes), not {recipe.layout}"
        )
    if opts.vote_files:
        return vote_files(recipe, opts, attributes)
    model_uri = opts.model_uri or f"models:/{registered_name(recipe)}@{tracking.CHAMPION}"
    short = f"@{tracking.CHAMPION}" if not opts.model_uri else model_uri
    name = f"infer {short}" + (f" vs {opts.ensemble}" if opts.ensemble else "")
    with tracking.start_step("inference", recipe, name) as run:
        run.log_params(options.params(dataclasses.replace(opts, model_uri=model_uri)))
        main = load_checkpoint(tracking.checkpoint_for(model_uri))
        inputs = inputs_for(recipe, given or {}, opts, model_uri, main)
        samples = inputs.samples
        context = "test" if inputs.part == "test" else "inference"
        run.log_datasets([data_part(inputs.recipe, inputs.part, samples, context)])
        pixels = Pixels(samples, recipe.workers, recipe.skip_bad)
        images = pixels(main.img_size)
        truth = images.labels if inputs.part == "test" else None  # only the test split is scored
        probs, spi = predict_member(main, images.pixels, opts.tta, default_device())
        results = {"soup": score(Prediction(model_uri, probs, spi), truth)}
        uris = ensemble_members(opts.ensemble, run.experiment_id, main.split)
        if uris:
            results["ensemble"] = predict_ensemble(uris, opts, main, pixels, attributes, truth)
        soup = results["soup"]
        frame = submission(
            samples,
            images.keys,
            soup.probs.argmax(1).numpy(),
            soup.probs if opts.probs else None,
            main.classes,
            recipe.layout if inputs.part == "inference" else "",  # its format lists its own inputs
        )
        run.log_predictions(frame, images.skipped)
        run.log_inference(
            {k: (v.accuracy, v.f1, v.seconds_per_image) for k, v in results.items()},
            len(samples),
            len(images.skipped),
        )
        if opts.output:
            write_atomically(frame, Path(opts.output))
        soup_run = tracking.soup_metrics(model_uri)
        run.describe(inference_note(model_uri, results, inputs, len(images.skipped), opts))
    return InferResult(
        run.id, results, frame, images.skipped, opts.output, soup_run, inputs.part, inputs.what
    )


def predict_ensemble(
    uris, opts: InferOptions, main: Checkpoint, pixels: Pixels, attributes, labels
) -> Prediction:
    """The ensemble's vote, one member in memory at a time (only its probabilities are kept)."""
    weights = member_weights(opts.weights, uris)
    member_probs, total = [], 0.0
    for uri in uris:
        ckpt = load_checkpoint(tracking.checkpoint_for(uri))
        if ckpt.classes != main.classes:
            raise SoupsError(f"ensemble member {uri} predicts other classes than the model")
        if labels is not None and ckpt.split != main.split:  # it may have trained on these images
            raise SoupsError(f"ensemble member {uri} was trained on split {ckpt.split}, not {main.split}")
        p, s = predict_member(ckpt, pixels(ckpt.img_size).pixels, opts.tta, default_device())
        member_probs.append(p)
        total += s
        log.info("ensemble member %s: %.2f ms per image", uri, 1000 * s)
    if opts.vote == "soft":
        combined = soft_vote(member_probs, weights)
    else:
        votes = [p.argmax(1).numpy() for p in member_probs]
        label = hard_vote(votes) if opts.vote == "hard" else attribute_vote(votes, attributes)
        combined = torch.nn.functional.one_hot(torch.from_numpy(label), len(main.classes)).float()
    log.info(
        "an ensemble of %d models costs %d forward passes per image; the soup costs 1", len(uris), len(uris)
    )
    return score(Prediction(f"{opts.vote} vote of {len(uris)}", combined, total), labels)


def vote_files(recipe: Recipe, opts: InferOptions, attributes) -> InferResult:
    """No model: a hard (or per-attribute) vote over earlier predictions.csv files."""
    if opts.vote == "soft":
        raise SoupsError("vote_files holds labels, not probabilities: use vote=hard or vote=attributes")
    paths = [p.strip() for p in opts.vote_files.split(",") if p.strip()]
    frame = vote_on_files(paths, opts.vote, attributes)
    name = f"vote {opts.vote} of {len(paths)} files"
    with tracking.start("inference", recipe.experiment, name=name) as run:
        run.log_params(options.params(opts))
        run.describe(f"**{opts.vote.capitalize()} vote** of the predictions in: {opts.vote_files}")
        run.log_predictions(frame, [])
    if opts.output:
        write_atomically(frame, Path(opts.output))
    return InferResult(
        run.id, {}, frame, [], opts.output, {}, "", f"a {opts.vote} vote of {len(paths)} files"
    )
