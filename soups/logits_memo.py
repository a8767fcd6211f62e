"""Logits computed once per model and image set. The steps of a pipeline score the same models on
the same held-out images again and again: `evaluate` scores every member on test, `infer`'s
ensemble votes with those members on those images and predicts with the soup the soup step has
just scored there, and a greedy soup of one ingredient is its best ingredient. Each result is kept
on disk under $SOUPS_CACHE/logits, named by digests of the weights, the images and how they were
fed (normalisation, device type), so changed weights or images make a new entry, never a stale
read. No MLflow here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch

from soups.models import cache_home, weights_digest


def architecture(model) -> str:
    """A timm model's architecture (without a pretrained tag), the key's name for what computes."""
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def images_digest(images: torch.Tensor) -> str:
    """blake2b of the pixels with their shape and dtype (about 0.1 s for 10,000 images at 48 px)."""
    t = images.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}\n".encode(), digest_size=20)
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# A change to how soups feeds or scores a model (model_input, predict) must bump this: old entries
# are then never read again.
MEMO_VERSION = 1


def entry(
    arch: str, weights: str, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device
) -> Path:
    """Where the logits of model `arch` with weights digest `weights` on `images` are kept: two
    architectures can share weights exactly (efficientnet_b0 and tf_efficientnet_b0 freshly built),
    and torch or timm can change what the same weights compute."""
    fed = [round(float(v), 6) for v in (*mean, *std)], torch.device(device).type
    code = f"{MEMO_VERSION}|torch {torch.__version__}|timm {timm.__version__}"
    key = hashlib.sha256(f"{arch}|{weights}|{images_digest(images)}|{fed}|{code}".encode()).hexdigest()
    return cache_home() / "logits" / key[:2] / f"{key}.pt"


def memo_logits(
    arch: str,
    state: dict[str, torch.Tensor] | str,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device,
    compute: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """`compute()`'s logits of model `arch` with weights `state` (or their digest) on `images`,
    from the cache when any step computed them before; with the seconds per image they took then
    (`compute` should hold only the forward passes: its time is what later steps report)."""
    path = entry(arch, state if isinstance(state, str) else weights_digest(state), images, mean, std, device)
    with contextlib.suppress(Exception):  # unreadable or foreign: compute it again and replace it
        kept = torch.load(path, weights_only=True)
        if kept["logits"].shape[0] == len(images):
            return kept["logits"], float(kept["seconds_per_image"])
    start = time.perf_counter()
    logits = compute()
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    keep(path, {"logits": logits, "seconds_per_image": seconds})
    return logits, seconds


def keep(path: Path, record: dict) -> None:
    """Write whole or not at all (concurrent steps may write the same entry); a read-only or full
    cache costs time, never the result."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - a cache is never worth a failed step
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
