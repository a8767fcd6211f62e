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
    Prediction,
    predict_member,
    score,
    submission,
    vote_on_files,
    write_atomically,
)
from soups.recipe import Recipe, registered_name
from soups.run_notes import data_part

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
    output: str = option("", "Also write predictions.csv here.")
    vote_files: str = option(
        "",
        "Instead of predicting: hard-vote (or vote=attributes) these comma-separated predictions.csv "
        "files, best first.",
    )


def ensemble_members(spec: str, experiment_id: str) -> list[str]:
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("top:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise SoupsError(f"ensemble={spec!r}: use top:<number>") from None
        runs = tracking.ranked_ingredients(experiment_id, limit=n)
        if not runs:
            raise SoupsError(f"ensemble={spec}: no finished ingredient runs in experiment {experiment_id}")
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


def inference_note(model_uri: str, results: dict, images: int, unreadable: int, opts: InferOptions) -> str:
    """The inference run's description: which model (and ensemble) predicted what, how well."""
    lines = [f"**Predictions** for {images} images ({unreadable} unreadable) with `{model_uri}`"]
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

    @property
    def rows(self) -> int:
        return len(self.frame)


def infer(recipe: Recipe, opts: InferOptions) -> InferResult:
    """Predict the recipe's test images with `model_uri` (and the ensemble, if any); log an
    inference run with predictions.csv. Returns what to print."""
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
        samples = layouts.inference_inputs(recipe, main.classes)
        part = "test" if len(samples) and (samples.labels >= 0).all() else "inference"
        run.log_datasets([data_part(recipe, part, samples, part)])
        pixels = Pixels(samples, recipe)
        images = pixels(main.img_size)
        probs, spi = predict_member(main, images.pixels, opts.tta, default_device())
        results = {"soup": score(Prediction(model_uri, probs, spi), images.labels)}
        uris = ensemble_members(opts.ensemble, run.experiment_id)
        if uris:
            results["ensemble"] = predict_ensemble(uris, opts, main, pixels, attributes, images.labels)
        soup = results["soup"]
        frame = submission(
            samples,
            images.keys,
            soup.probs.argmax(1).numpy(),
            soup.probs if opts.probs else None,
            main.classes,
            recipe.layout,
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
        run.describe(inference_note(model_uri, results, len(samples), len(images.skipped), opts))
    return InferResult(run.id, results, frame, images.skipped, opts.output, soup_run)


class Pixels:
    """The images decoded once per image size (ensemble members may differ in it)."""

    def __init__(self, samples: data.Samples, recipe: Recipe):
        self.samples, self.recipe, self.decoded = samples, recipe, {}

    def __call__(self, size: int) -> data.Decoded:
        if size not in self.decoded:
            r = self.recipe
            self.decoded[size] = data.decode(self.samples, size, r.workers, r.skip_bad, "decode")
        return self.decoded[size]


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
    return InferResult(run.id, {}, frame, [], opts.output, {})
