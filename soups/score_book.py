"""Held-out scores already paid for, so that a soup that continues an earlier one scores only what
is new. No MLflow here.

A score is kept under the exact weights scored (their sha256) and the exact scoring (images,
labels, BatchNorm images, normalisation, batch size, device type, architecture): a continued
greedy soup replays the algorithm from its first candidate, and every candidate soup it had
scored before comes back from the book instead of the model. So continuing gives the soup that
starting over gives, by construction (a new run that ranks above the old ones only means fewer
scores come from the book), and its scoring grows with the new runs. An early-stopped score is
kept as what it proved: more than `max_errors` errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

MISS = object()  # lookup: not in the book (or not decided by what the book holds)
VERSION = 2  # bump when a score's meaning changes (a new early-stopping rule, a new key)


RECOMPUTED = "r-"  # a scoring that recomputes BatchNorm statistics of whatever weights it scores


def scoring_key(recomputes: bool, *parts: object) -> str:
    """A digest of what decides a score besides the weights: tensors by their bytes, the rest by
    repr; marked when the scoring recomputes BatchNorm statistics (see `ScoreBook.alias`)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{VERSION}".encode())
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"|{t.dtype}{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f"|{part!r}|".encode())
    return (RECOMPUTED if recomputes else "n-") + h.hexdigest()


@dataclass
class ScoreBook:
    """`entries[key] = [correct, None]` (exact) or `[None, errors_over]` (stopped early: more than
    that many errors). `reused` counts the scores it answered."""

    entries: dict[str, list] = field(default_factory=dict)
    reused: int = 0

    @staticmethod
    def key(weights: str, scoring: str) -> str:
        return f"{weights}:{scoring}"

    def lookup(self, key: str, size: int, max_errors: int | None):
        """What `Scorer.correct(state, max_errors)` would return, or MISS when the book cannot say."""
        entry = self.entries.get(key)
        if entry is None:
            return MISS
        correct, errors_over = entry
        if correct is not None:
            self.reused += 1
            return correct if max_errors is None or size - correct <= max_errors else None
        if max_errors is not None and max_errors <= errors_over:
            self.reused += 1
            return None
        return MISS  # it stopped early under a tighter bound than this question's

    def record(self, key: str, correct: int | None, max_errors: int | None) -> None:
        if correct is not None:
            self.entries[key] = [correct, None]
        elif self.entries.get(key, [None, -1])[0] is None:
            self.entries[key] = [None, max(max_errors or 0, self.entries.get(key, [None, -1])[1])]

    def alias(self, weights: str, same_as: str) -> None:
        """`weights` are `same_as` with BatchNorm statistics recomputed: wherever a scoring
        recomputes them again, they score exactly as `same_as` did (and nowhere else)."""
        for key, entry in list(self.entries.items()):
            if key.startswith(f"{same_as}:{RECOMPUTED}"):
                self.entries.setdefault(f"{weights}:{key.split(':', 1)[1]}", list(entry))

    def to_json(self) -> dict:
        return {"version": VERSION, "entries": self.entries}

    @classmethod
    def from_json(cls, doc: dict) -> ScoreBook:
        """An earlier step's book; one of another version is read as empty (its keys mean other things)."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            return cls()
        entries = doc.get("entries") or {}
        return cls({k: list(v) for k, v in entries.items() if isinstance(v, list) and len(v) == 2})
