"""The infer step: predictions from a registered soup (or any checkpoint), optionally next to an
ensemble of other models, written as the competition's submission or a plain CSV."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soups import SoupsError, data, layouts, tracking
from soups.ensemble import VOTES, attribute_vote, hard_vote, soft_vote
from soups.evaluate import confusion, default_device, macro_f1
from soups.finetune import data_part
from soups.layouts import Attributes
from soups.models import Checkpoint, load_checkpoint
from soups.predict import Predictor
from soups.recipe import Recipe, registered_name

log = logging.getLogger(__name__)
TTA = ("none", "hflip")
BAD = -1  # the explicit label of an image that could not be read (skip_bad)


@dataclass(frozen=True)
class InferOptions:
    model_uri: str = ""  # default: models:/<the recipe's registered name>@champion
    ensemble: str = ""  # comma-separated model URIs, or top:N (the N best ingredient runs)
    weights: str = ""  # "" equal | val (each member's val_accuracy) | w1,w2,...
    vote: str = "soft"
    tta: str = "none"
    probs: bool = False
    output: str = ""
    vote_files: str = ""  # comma-separated predictions.csv files to hard-vote, best first (no model)


@dataclass
class Prediction:
    name: str
    probs: torch.Tensor  # N x C over the readable images
    seconds_per_image: float
    accuracy: float | None = None
    f1: float | None = None


def predict_member(ckpt: Checkpoint, pixels: np.ndarray, tta: str, device) -> tuple[torch.Tensor, float]:
    """Class probabilities of one model (averaged over the TTA views) and its seconds per image."""
    predictor = Predictor(ckpt, device)
    start = time.perf_counter()
    probs = predictor.probabilities(pixels)
    if tta == "hflip":
        probs = (probs + predictor.probabilities(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
    return probs, (time.perf_counter() - start) / max(len(pixels), 1)


def score(pred: Prediction, labels: np.ndarray) -> Prediction:
    if len(labels) and (labels >= 0).all():
        guess = pred.probs.argmax(1)
        truth = torch.from_numpy(labels)
        pred.accuracy = float((guess == truth).float().mean())
        pred.f1 = macro_f1(confusion(guess, truth, pred.probs.shape[1]))
    return pred


def submission(
    samples: data.Samples,
    readable: list[str],
    labels: np.ndarray,
    probs: torch.Tensor | None,
    classes: list[str],
    layout: str,
) -> pd.DataFrame:
    """One row per input image, in input order; unreadable images get label -1 (never dropped).
    A layout with its own submission format (the mask competition's) writes that instead."""
    by_key = dict(zip(readable, labels.tolist(), strict=True))
    column = [by_key.get(k, BAD) for k in samples.keys]
    if (own := layouts.get(layout).submission) is not None:
        return own(samples, column)
    frame = pd.DataFrame(
        {
            "path": samples.keys,
            "label": column,
            "class_name": [classes[c] if c != BAD else "<unreadable>" for c in column],
        }
    )
    if probs is not None:
        rows = {k: j for j, k in enumerate(readable)}
        full = np.full((len(samples), len(classes)), np.nan, np.float32)
        for j, k in enumerate(samples.keys):
            if k in rows:
                full[j] = probs[rows[k]].numpy()
        frame = pd.concat([frame, pd.DataFrame(full, columns=[f"p_{c}" for c in classes])], axis=1)
    return frame


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


def write_atomically(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        frame.to_csv(f, index=False)
    os.replace(tmp, path)


def vote_on_files(paths: list[str], vote: str, attributes: Attributes | None = None) -> pd.DataFrame:
    """Hard (or per-attribute) vote over predictions.csv files of the same images, best first."""
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_csv(path))
        except (OSError, pd.errors.ParserError) as e:
            raise SoupsError(f"cannot read predictions {path}: {e}") from None
    key, label = ("ImageID", "ans") if "ImageID" in frames[0].columns else ("path", "label")
    for path, frame in zip(paths, frames, strict=True):
        if not {key, label} <= set(frame.columns):
            raise SoupsError(f"{path} lacks columns {key},{label}")
        if frame[key].tolist() != frames[0][key].tolist():
            raise SoupsError(f"{path} lists other images (or another order) than {paths[0]}")
    labels = [frame[label].to_numpy() for frame in frames]
    voted = attribute_vote(labels, attributes) if vote == "attributes" else hard_vote(labels)
    return pd.DataFrame({key: frames[0][key], label: voted})


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


def infer(recipe: Recipe, opts: InferOptions) -> dict:
    """Predict the recipe's test images with `model_uri` (and the ensemble, if any); log an
    inference run with predictions.csv. Returns what to print."""
    if opts.tta not in TTA:
        raise SoupsError(f"tta={opts.tta!r} must be one of {', '.join(TTA)}")
    if opts.vote not in VOTES:
        raise SoupsError(f"vote={opts.vote!r} must be one of {', '.join(VOTES)}")
    attributes = layouts.get(recipe.layout).attributes
    if opts.vote == "attributes" and attributes is None:
        having = " or ".join(k for k, v in layouts.LAYOUTS.items() if v.attributes)
        raise SoupsError(
            f"vote=attributes needs the {having} layout (labels that combine attributes), not {recipe.layout}"
        )
    if opts.vote_files:
        if opts.vote == "soft":
            raise SoupsError("vote_files holds labels, not probabilities: use vote=hard or vote=attributes")
        paths = [p.strip() for p in opts.vote_files.split(",") if p.strip()]
        frame = vote_on_files(paths, opts.vote, attributes)
        name = f"vote {opts.vote} of {len(paths)} files"
        with tracking.start("inference", recipe.experiment, name=name) as run:
            run.log_params({"vote_files": opts.vote_files, "vote": opts.vote})
            run.describe(f"**{opts.vote.capitalize()} vote** of the predictions in: {opts.vote_files}")
            run.log_table(frame, tracking.PREDICTIONS)
        if opts.output:
            write_atomically(frame, Path(opts.output))
        return {
            "run_id": run.id,
            "results": {},
            "rows": len(frame),
            "skipped": [],
            "output": opts.output,
            "soup_run": {},
            "frame": frame,
        }
    model_uri = opts.model_uri or f"models:/{registered_name(recipe)}@{tracking.CHAMPION}"
    device = default_device()
    short = f"@{tracking.CHAMPION}" if not opts.model_uri else model_uri
    name = f"infer {short}" + (f" vs {opts.ensemble}" if opts.ensemble else "")
    with tracking.start_step("inference", recipe, name) as run:
        run.log_params(
            {"model_uri": model_uri, "ensemble": opts.ensemble, "tta": opts.tta, "vote": opts.vote}
        )
        main = load_checkpoint(tracking.checkpoint_for(model_uri))
        samples = layouts.inference_inputs(recipe, main.classes)
        labelled = len(samples) and (samples.labels >= 0).all()
        part = "test" if labelled else "inference"
        run.log_datasets([data_part(recipe, part, samples, part)])
        decoded: dict[int, data.Decoded] = {}

        def pixels(size: int) -> data.Decoded:
            if size not in decoded:  # decode once per image size
                decoded[size] = data.decode(samples, size, recipe.workers, recipe.skip_bad, "decode")
            return decoded[size]

        images = pixels(main.img_size)
        labels = images.labels
        probs, spi = predict_member(main, images.pixels, opts.tta, device)
        results = {"soup": score(Prediction(model_uri, probs, spi), labels)}
        uris = ensemble_members(opts.ensemble, run.experiment_id)
        if uris:
            weights = member_weights(opts.weights, uris)
            member_probs, total = [], 0.0
            for uri in uris:  # one model in memory at a time; only its probabilities are kept
                ckpt = load_checkpoint(tracking.checkpoint_for(uri))
                if ckpt.classes != main.classes:
                    raise SoupsError(f"ensemble member {uri} predicts other classes than {model_uri}")
                p, s = predict_member(ckpt, pixels(ckpt.img_size).pixels, opts.tta, device)
                member_probs.append(p)
                total += s
                log.info("ensemble member %s: %.2f ms per image", uri, 1000 * s)
            if opts.vote == "soft":
                combined = soft_vote(member_probs, weights)
            else:
                votes = [p.argmax(1).numpy() for p in member_probs]
                label = hard_vote(votes) if opts.vote == "hard" else attribute_vote(votes, attributes)
                combined = torch.nn.functional.one_hot(torch.from_numpy(label), len(main.classes)).float()
            results["ensemble"] = score(
                Prediction(f"{opts.vote} vote of {len(uris)}", combined, total), labels
            )
            log.info(
                "an ensemble of %d models costs %d forward passes per image; the soup costs 1",
                len(uris),
                len(uris),
            )
        frame = submission(
            samples,
            images.keys,
            results["soup"].probs.argmax(1).numpy(),
            results["soup"].probs if opts.probs else None,
            main.classes,
            recipe.layout,
        )
        run.log_table(frame, tracking.PREDICTIONS)
        if images.skipped:
            run.log_table(pd.DataFrame({"unreadable": images.skipped}), tracking.SKIPPED)
        run.log_inference(
            {k: (v.accuracy, v.f1, v.seconds_per_image) for k, v in results.items()},
            len(samples),
            len(images.skipped),
        )
        if opts.output:
            write_atomically(frame, Path(opts.output))
        soup_run = tracking.soup_metrics(model_uri)
        run.describe(inference_note(model_uri, results, len(samples), len(images.skipped), opts))
    return {
        "run_id": run.id,
        "results": results,
        "rows": len(frame),
        "skipped": images.skipped,
        "output": opts.output,
        "soup_run": soup_run,
        "frame": frame,
    }
