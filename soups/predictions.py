"""Predictions as files: one model's (or an ensemble's) probabilities scored against labels, the
submission table (one row per input image, unreadable ones marked), and votes over prediction
files. Free of MLflow."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soups import SoupsError, data, layouts
from soups.ensemble import attribute_vote, hard_vote
from soups.evaluate import confusion, macro_f1
from soups.layouts import Attributes
from soups.logits_memo import architecture, memo_logits
from soups.models import Checkpoint, weights_digest
from soups.predict import Predictor

BAD = -1  # the label of an image that could not be read


@dataclass
class Prediction:
    name: str
    probs: torch.Tensor  # N x C over the readable images
    seconds_per_image: float
    accuracy: float | None = None
    f1: float | None = None


class Pixels:
    """The images decoded once per image size (ensemble members may differ in it)."""

    def __init__(self, samples: data.Samples, workers: int, skip_bad: bool):
        self.samples, self.workers, self.skip_bad, self.decoded = samples, workers, skip_bad, {}

    def __call__(self, size: int) -> data.Decoded:
        if size not in self.decoded:
            self.decoded[size] = data.decode(self.samples, size, self.workers, self.skip_bad, "decode")
        return self.decoded[size]


def predict_member(ckpt: Checkpoint, pixels: np.ndarray, tta: str, device) -> tuple[torch.Tensor, float]:
    """Class probabilities of one model (averaged over the TTA views) and its seconds per image.
    A view an earlier step scored this model on (evaluate, the soup step) is read back, with the
    seconds per image measured then."""
    predictor = Predictor(ckpt, device)
    digest = weights_digest(ckpt.state_dict)
    views = [pixels] + ([np.ascontiguousarray(pixels[:, :, ::-1])] if tta == "hflip" else [])
    probs, seconds = torch.zeros(len(pixels), ckpt.num_classes), 0.0
    for view in views:
        logits, s = memo_logits(
            architecture(predictor.model),
            digest,
            torch.from_numpy(view),
            ckpt.mean,
            ckpt.std,
            device,
            partial(predictor.logits, view),
        )
        probs, seconds = probs + logits.softmax(1), seconds + s
    return probs / len(views), seconds


def score(pred: Prediction, labels: np.ndarray | None) -> Prediction:
    """`pred` with its accuracy and F1 against `labels`; unscored without labels (None, or any
    image unlabelled)."""
    if labels is not None and len(labels) and (labels >= 0).all():
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
    `layout` names the layout whose own submission format to write (the mask competition's, for
    its eval/ images): empty for soups' CSV."""
    by_key = dict(zip(readable, labels.tolist(), strict=True))
    column = [by_key.get(k, BAD) for k in samples.keys]
    if layout and (own := layouts.get(layout).submission) is not None:
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
