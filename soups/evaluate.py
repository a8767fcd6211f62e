"""Scoring models on evaluation sets decoded once. No MLflow here."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from soups.data import Decoded, model_input
from soups.logits_memo import architecture, memo_logits
from soups.models import weights_digest
from soups.score_book import MISS, ScoreBook, scoring_key


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """Logits (N x C, float32, on the CPU) of `model` on every image of `evalset`, computed on
    `device` (the model is moved there: a checkpoint is always built on the CPU)."""
    device = torch.device(device)
    model.to(device).eval()
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


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(model: nn.Module, images: EvalSet, mean, std, batch_size: int, device) -> None:
    """Recompute BatchNorm running statistics on `images` (averaged weights make the averaged
    statistics wrong). torch's SWA helper does the bookkeeping."""
    device = torch.device(device)
    batches = (model_input(x.to(device), mean, std) for x, _ in images.batches(batch_size))
    with autocast(device):
        torch.optim.swa_utils.update_bn(batches, model)


class Scorer:
    """Scores state dicts of one architecture on a held-out set decoded once; counts every image
    it scores. With `bn_images`, every model it scores, single or averaged, gets its BatchNorm
    statistics recomputed on those (training) images first: averaged weights need it, and a single
    model scored without it would be compared under another treatment (the demo's best member:
    88.48 test as trained, 88.56 recomputed)."""

    def __init__(
        self,
        model: nn.Module,
        held_out: EvalSet,
        mean,
        std,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        bn_images: EvalSet | None = None,
        book: ScoreBook | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.held_out, self.mean, self.std = held_out, mean, std
        self.batch_size, self.bn_images = batch_size, bn_images
        self.book = book if book is not None else ScoreBook()  # scores paid for before (shared with subsets)
        self._scoring: str | None = None
        # Shared with the scorers of subsets: [held-out images scored, training images forwarded
        # to recompute BatchNorm statistics, models scored]; all work the soup step did.
        self._scored = [0, 0, 0]

    @property
    def size(self) -> int:
        return len(self.held_out)

    @property
    def images_scored(self) -> int:
        return self._scored[0]

    @property
    def recalibration_images(self) -> int:
        return self._scored[1]

    @property
    def models_scored(self) -> int:
        """Calls of `correct` that ran the model (not answered by the book)."""
        return self._scored[2]

    @property
    def scoring(self) -> str:
        """What decides a score here besides the weights (the book's key), computed once."""
        if self._scoring is None:
            bn = self.bn_images
            device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
            self._scoring = scoring_key(
                bn is not None,
                architecture(self.model),
                self.held_out.images,
                self.held_out.labels,
                None if bn is None else bn.images,
                [round(float(v), 6) for v in (*self.mean, *self.std)],
                self.batch_size,
                device,
                torch.__version__,
                timm.__version__,
            )
        return self._scoring

    def subset(self, idx) -> Scorer:
        """A scorer of the same model on part of the held-out set (its counts add to this one's)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        part = EvalSet(self.held_out.images[idx], self.held_out.labels[idx], self.held_out.num_classes)
        out = Scorer(
            self.model, part, self.mean, self.std, self.batch_size, self.device, self.bn_images, self.book
        )
        out._scored = self._scored
        return out

    def load(self, state: dict[str, torch.Tensor], recalibrate: bool = True) -> nn.Module:
        """The model with `state`, its BatchNorm statistics recomputed when this scorer does that
        (`recalibrate=False`: a state recomputed already, as the soup that ships)."""
        self.model.load_state_dict(state)
        if recalibrate and self.bn_images is not None:
            recalibrate_bn(self.model, self.bn_images, self.mean, self.std, self.batch_size, self.device)
            self._scored[1] += len(self.bn_images)
        return self.model.eval()

    @torch.inference_mode()
    def correct(self, state: dict[str, torch.Tensor], max_errors: int | None = None) -> int | None:
        """Correct predictions on the held-out set, or None once errors exceed `max_errors`; from
        the book when these very weights were scored this way before."""
        key = self.book.key(weights_digest(state), self.scoring)
        if (known := self.book.lookup(key, self.size, max_errors)) is not MISS:
            return known
        model = self.load(state)
        self._scored[2] += 1
        errors, correct = 0, len(self.held_out)
        for images, labels in self.held_out.batches(self.batch_size):
            with autocast(self.device):
                preds = model(model_input(images.to(self.device), self.mean, self.std)).argmax(1).cpu()
            errors += int((preds != labels).sum())
            self._scored[0] += len(labels)
            if max_errors is not None and errors > max_errors:
                correct = None
                break
        else:
            correct -= errors
        self.book.record(key, correct, max_errors)
        return correct

    def logits(
        self, state: dict[str, torch.Tensor], evalset: EvalSet | None = None, recalibrate: bool = True
    ) -> torch.Tensor:
        evalset = evalset or self.held_out

        def compute(recalibrate: bool = recalibrate) -> torch.Tensor:
            model = self.load(state, recalibrate)
            return predict(model, evalset, self.mean, self.std, self.batch_size, self.device)

        if recalibrate and self.bn_images is not None:
            return compute()
        # Weights as they are: any step that scored them on these images before did this work.
        return memo_logits(
            architecture(self.model), state, evalset.images, self.mean, self.std, self.device, compute
        )[0]


def attribute_scores(attributes, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """For a layout whose labels combine attributes (mask x gender x age): the accuracy of each
    attribute on its own."""
    true, pred = attributes.split(labels.numpy()), attributes.split(logits.argmax(1).numpy())
    return {a: float((true[a] == pred[a]).mean()) for a in attributes.names}


def attribute_accuracy(attributes):
    """`attribute_scores` as the training loop's extra val metrics, `val_<attribute>_accuracy`."""

    def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {f"val_{a}_accuracy": v for a, v in attribute_scores(attributes, logits, labels).items()}

    return scores
