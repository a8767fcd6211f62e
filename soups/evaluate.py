"""Scoring models on evaluation sets decoded once. No MLflow here."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soups.data import Decoded, model_input


@dataclass(frozen=True)
class EvalSet:
    """Images decoded and resized once (uint8, NHWC) with their labels; every model scored on
    it reuses the same tensors."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @classmethod
    def from_decoded(cls, decoded: Decoded, num_classes: int) -> EvalSet:
        return cls(torch.from_numpy(decoded.pixels), torch.from_numpy(decoded.labels), num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.inference_mode()
def predict(
    model: nn.Module,
    evalset: EvalSet,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits (N x C, float32, on the CPU) of `model` on every image of `evalset`."""
    device = torch.device(device)
    model.eval()
    out = []
    for images, _ in evalset.batches(batch_size):
        with autocast(device):
            out.append(model(model_input(images.to(device), mean, std)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, evalset.num_classes)


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """C x C counts, rows true class, columns predicted."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in labels or predictions."""
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy, f1 (macro), loss (cross-entropy) and correct (an exact count, for comparisons)."""
    num_classes = logits.shape[1]
    preds = logits.argmax(1)
    correct = int((preds == labels).sum())
    return {
        "accuracy": correct / max(len(labels), 1),
        "f1": macro_f1(confusion(preds, labels, num_classes)),
        "loss": float(F.cross_entropy(logits, labels.long())) if len(labels) else 0.0,
        "correct": correct,
    }
