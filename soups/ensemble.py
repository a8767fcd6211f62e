"""Ensembles the competition team used, to compare against the soup: soft voting (optionally
weighted) over probabilities, hard voting over predictions, and a per-attribute vote for layouts
whose labels combine attributes (the mask layout's mask x gender x age). No MLflow here. An
ensemble of N models costs N forward passes per image; a soup costs one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from soups import SoupsError
from soups.layouts import Attributes


def soft_vote(probs: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of the members' class probabilities (N x C each); equal weights by default."""
    if not probs:
        raise SoupsError("an ensemble needs at least one member")
    w = (
        torch.ones(len(probs), dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64)
    )
    if len(w) != len(probs) or (w < 0).any() or w.sum() <= 0:
        raise SoupsError(
            f"ensemble weights {list(map(float, w))} must be {len(probs)} non-negative numbers, not all 0"
        )
    stacked = torch.stack([p.double() for p in probs])
    return (stacked * (w / w.sum()).view(-1, 1, 1)).sum(0).float()


def hard_vote(preds: Sequence[np.ndarray]) -> np.ndarray:
    """Majority of the members' predicted labels, members ordered best first: a tie goes to the
    label of the best member among those tied. A negative label (an unreadable image) abstains;
    with no vote at all the answer stays -1."""
    if not preds:
        raise SoupsError("an ensemble needs at least one member")
    stacked = np.stack([np.asarray(p, dtype=np.int64) for p in preds])  # members x N
    out = np.full(stacked.shape[1], -1, dtype=np.int64)
    for j, column in enumerate(stacked.T):
        column = column[column >= 0]
        if not len(column):
            continue
        labels, counts = np.unique(column, return_counts=True)
        tied = set(labels[counts == counts.max()].tolist())
        out[j] = next(v for v in column if v in tied)  # best member first
    return out


def attribute_vote(preds: Sequence[np.ndarray], attributes: Attributes) -> np.ndarray:
    """Vote each attribute separately (mask, gender, age), then recombine them into labels."""
    parts = []
    for p in preds:
        p = np.asarray(p, dtype=np.int64)
        parts.append({a: np.where(p >= 0, v, -1) for a, v in attributes.split(np.maximum(p, 0)).items()})
    votes = {a: hard_vote([p[a] for p in parts]) for a in attributes.names}
    label = attributes.join(*(votes[a] for a in attributes.names))
    return np.where(votes[attributes.names[0]] >= 0, label, -1)


VOTES = {
    "soft": "mean of probabilities",
    "hard": "majority of predicted labels",
    "attributes": "majority per attribute, where labels combine attributes (mask layout: mask, gender, age)",
}
