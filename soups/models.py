"""timm models, pretrained sources and the checkpoint format every step shares.

Checkpoint (`checkpoint/model.pt` in a run): a plain dict readable with
`torch.load(weights_only=True)`: state_dict, model, num_classes, classes, img_size, split,
mean, std. Checkpoints are data, never code: nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from soups import SoupsError

log = logging.getLogger(__name__)


# Seeds the random initialisation of every model this package builds, whatever the caller's seed:
# sweep members started from random weights (pretrained=none) then start from the very same
# weights, as members started from pretrained ones do, instead of silently from N different ones.
INIT_SEED = 0


def create_model(name: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    """A timm model with a fresh `num_classes` head; `pretrained` names where the other weights
    come from (see `resolve_pretrained`). MLflow URIs must be turned into files first. The same
    arguments always give the same weights."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        raise SoupsError(f"unknown timm model {name!r}" + (f" (close: {', '.join(close)})" if close else ""))
    from_hub = pretrained == "timm"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = timm.create_model(name, pretrained=from_hub, num_classes=num_classes)
    except Exception as e:
        if not from_hub:
            raise
        raise SoupsError(
            f"could not fetch timm's pretrained weights for {name} ({type(e).__name__}: {e}); "
            "offline machines need pretrained=<local .pt/.pth/.safetensors file>"
        ) from None
    if pretrained not in ("none", "timm"):
        path = resolve_pretrained(pretrained)
        log.info("pretrained %s: %s", pretrained, load_backbone(model, read_state_dict(path), path))
    zero_head(model)
    return model


def zero_head(model: nn.Module) -> None:
    """Start the classifier at zero (as Big Transfer does): every member of a sweep then starts
    from the very same weights whatever its seed, which keeps them in one basin for the soup,
    and the first steps don't push random-head noise into the pretrained features."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights themselves (names, dtypes, shapes and values), whatever file or
    metadata carried them: two runs with the same digest started from the very same weights."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_start(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a sweep's starting weights into `model`: every key, head included, strictly (a start
    that fits only partly would put members in different places, which is what it is there to
    prevent)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or wrong:
        if missing:
            first = f"key {missing[0]} missing"
        elif extra:
            first = f"unexpected key {extra[0]}"
        else:
            k = wrong[0]
            first = f"{k} has shape {tuple(weights[k].shape)}, the model {tuple(own[k].shape)}"
        raise SoupsError(
            f"start {source} does not fit {type(model).__name__}: {first} ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of another shape); a start must be trained with the "
            "same model and classes as its members"
        )
    model.load_state_dict(weights, strict=True)


def resolve_pretrained(source: str) -> Path:
    """A local file for `source`: a path, or `pkg:<module>/<file>` inside an installed package."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        raise SoupsError(f"pretrained={source}: MLflow URIs are resolved by the entry point, not here")
    if source.startswith("pkg:"):
        module, _, rel = source[4:].partition("/")
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise SoupsError(f"pretrained={source}: package {module!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise SoupsError(f"pretrained file {path} not found (pretrained={source})")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file (a state dict, a soups checkpoint, or a
    training checkpoint wrapping one under `state_dict` / `model` / `model_state_dict`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SoupsError(f"cannot read weights from {path}: {type(e).__name__}: {e}".split("\n")[0]) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SoupsError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier, which a pretrained file never fills."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def _bookkeeping(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # absent from some files; never worth matching


def load_backbone(model: nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> str:
    """Load every tensor of `model` but its head from `weights`: by name where all names match,
    else by position where every shape matches in order. Returns how it loaded, for the log."""
    own = model.state_dict()
    head = head_keys(model)
    body = [k for k in own if k not in head and not _bookkeeping(k)]
    theirs = [k for k in weights if not _bookkeeping(k)]
    if all(k in weights and weights[k].shape == own[k].shape for k in body):
        pairs = [(k, k) for k in body]
        how = f"loaded {len(pairs)} tensors by name"
    else:
        # With the head included (the file has one too) or without it (a backbone-only file).
        full = [k for k in own if not _bookkeeping(k)]
        order = full if len(theirs) == len(full) else body
        pairs = [(k, t) for k, t in zip(order, theirs, strict=False) if k not in head]
        bad = [(k, t) for k, t in pairs if own[k].shape != weights[t].shape]
        if len(theirs) != len(order) or bad:
            detail = ", ".join(
                f"{k} {tuple(own[k].shape)} vs {t} {tuple(weights[t].shape)}" for k, t in bad[:3]
            )
            raise SoupsError(
                f"pretrained {source} does not fit {type(model).__name__}: {len(theirs)} tensors "
                f"for {len(body)} (+{len(head)} head); names differ"
                + (f" and shapes disagree in order: {detail}" if detail else "")
            )
        how = f"key names differ: loaded {len(pairs)} tensors by position ({pairs[0][1]} -> {pairs[0][0]}, …)"
    with torch.no_grad():
        for k, t in pairs:
            own[k].copy_(weights[t])
    return how


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    model: str
    num_classes: int
    classes: list[str]
    img_size: int
    split: str
    mean: list[float]
    std: list[float]

    def build(self) -> nn.Module:
        model = create_model(self.model, self.num_classes)
        model.load_state_dict(self.state_dict)
        return model


def normalisation(model: nn.Module) -> tuple[list[float], list[float]]:
    cfg = timm.data.resolve_data_config({}, model=model)
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: Path) -> str:
    """Write atomically (a temporary file in the same folder, then rename): a crash leaves either
    no file or a whole one. Returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = asdict(ckpt)
    record["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256(path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a soups checkpoint with `weights_only=True` (its sha256 is checked where it is
    downloaded: `tracking.cached_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise SoupsError(f"checkpoint {path} not found")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SoupsError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".split("\n")[0]) from None
    fields = Checkpoint.__dataclass_fields__
    if not isinstance(record, dict) or set(fields) - set(record):
        raise SoupsError(f"{path} is not a soups checkpoint (needs keys {', '.join(fields)})")
    return Checkpoint(**{k: record[k] for k in fields})


UNLOGGED = Path("unlogged-checkpoints")
CACHE_ENV = "SOUPS_CACHE"  # the root of this machine's caches: checkpoints by run id, logits


def cache_home() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/soups")).expanduser()


def keep_locally(path: Path, run_id: str) -> Path:
    """Move a checkpoint the server would not take to ./unlogged-checkpoints/<run id>/model.pt."""
    dst = (UNLOGGED / run_id / path.name).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, dst)
    return dst
