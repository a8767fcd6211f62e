"""Recipes: dataclass defaults <- recipe YAML <- hyperparameters drawn for index i <- overrides.

An unknown key at any layer is an error, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from soups import SoupsError
from soups.augment import PIPELINES
from soups.data import Splits, make_splits
from soups.layouts import LAYOUTS, option_names, read_layout
from soups.losses import LOSSES
from soups.options import coerce, option

if TYPE_CHECKING:
    from soups.batches import LoaderSettings

START_MODES = ("finetune", "probe")


@dataclass
class Recipe:
    """Everything one fine-tune needs. Each field is also an entry-point option and a run param."""

    experiment: str = option("soups", "MLflow experiment for runs started outside `mlflow run`.")
    data: str = option("", "Dataset root folder.")
    layout: str = option(
        "imagefolder",
        "Dataset layout: " + "; ".join(f"{k} ({v.help})" for k, v in LAYOUTS.items()) + ".",
        choices=tuple(LAYOUTS),
    )
    model: str = option("tf_efficientnet_lite0", "Any timm model name; its head is reset.")
    pretrained: str = option(
        "none",
        "Initial weights: none | timm (hub, needs internet) | a .pt/.pth/.safetensors file | "
        "pkg:<module>/<file inside an installed package> | runs:/<id>/<path> | models:/<name>@<alias>.",
    )
    start: str = option(
        "none",
        "Where sweep members start: none (the pretrained weights with a zero head) | auto (the newest "
        "start run of this experiment with the same model and split, trained first when there is "
        "none) | runs:/<id> | "
        "models:/<name>@<alias> | a soups checkpoint file. Loaded strictly, head included.",
    )
    start_mode: str = option(
        "finetune",
        "What the start step trains: finetune (every weight, start_epochs epochs of member i's draw) | "
        "probe (the head alone; give it a larger lr, e.g. 1e-2).",
        choices=START_MODES,
    )
    start_epochs: int = option(3, "Epochs of the start step (members then train `epochs` more).")
    img_size: int = option(224, "Square input size in pixels.")
    batch_size: int = option(32, "Images per optimisation step.")
    epochs: int = option(2, "Passes over the training split.")
    lr: float = option(1e-3, "Peak AdamW learning rate.")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    warmup: float = option(0.1, "Fraction of steps spent warming up linearly before the cosine decay.")
    clip_grad: float = option(1.0, "Clip the gradient norm to this value (0 disables).")
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy loss.")
    ema: float = option(
        0.0,
        "Keep an exponential moving average of the weights with this decay (timm's ModelEmaV3, "
        "warmed up), validated and saved instead of the last weights (0: off).",
    )
    aug: str = option(
        "light",
        "Training augmentation: light flips; medium adds small affine moves and colour jitter; heavy "
        "adds random resized crops and coarse dropout (soups/augment.py).",
        PIPELINES,
    )
    loss: str = option(
        "cross_entropy",
        "Training loss: cross_entropy | focal | supcon (supervised contrastive on a projection head, "
        "added to cross-entropy).",
        choices=LOSSES,
    )
    focal_gamma: float = option(2.0, "Focusing exponent of the focal loss.")
    supcon_weight: float = option(0.1, "Weight of the supervised-contrastive term (loss=supcon).")
    oversample: str = option(
        "",
        "Repeat these classes of the training split: comma-separated class names or indices, or "
        "`old` (every >=60 class of the mask layout). Never val or test images.",
    )
    oversample_factor: int = option(2, "How many times an oversampled image is seen per epoch in all.")
    oversample_aug: str = option("heavy", "Augmentation of the repeated images.", PIPELINES)
    relabel: str = option("", "Mask layout: YAML of label corrections by person id, applied at load time.")
    age_bins: str = option("30,60", "Mask layout: the two age boundaries, young < a <= middle < b <= old.")
    seed: int = option(0, "Seed for weight init of the head, data order and augmentation.")
    val_ratio: float = option(0.1, "Share of groups held out for validation (ranking and soups).")
    test_ratio: float = option(0.1, "Share of groups held out for testing, where the data has no test set.")
    split_seed: int = option(0, "Seed of the train/val/test split; ingredients of one soup share it.")
    max_train: int = option(0, "Use at most this many training images (0: all).")
    max_val: int = option(0, "Use at most this many validation images (0: all).")
    max_test: int = option(0, "Use at most this many test images (0: all).")
    workers: int = option(
        2,
        "Processes loading training images and threads decoding held-out ones. On a CPU, training "
        "images decoded in memory (cache_mb) are augmented in the training process instead.",
    )
    save_every: int = option(
        0,
        "Keep the full training state (weights, optimizer, schedule, random state) as an artifact "
        "every this many epochs, so that `finetune -P resume=<run id>` can continue the run (0: never).",
    )
    sync_bn: bool = option(
        False, "With several processes (nproc or torchrun): BatchNorm statistics over the whole batch."
    )
    cache_mb: int = option(2048, "Keep decoded, resized images in memory when they fit in this many MiB.")
    skip_bad: bool = option(False, "Skip unreadable images (counted in the run) instead of failing.")
    registered_model: str = option(
        "",
        "Registered model name the soup step writes and infer reads [default: <data folder name>-soup].",
    )
    description: str = option("", "Markdown description of the experiment, set on it when it has none.")
    system_metrics: bool = option(
        False, "Log CPU, memory and GPU use while the step runs (MLflow system metrics)."
    )
    i: int = option(0, "Index of this member of the sweep: seeds the draw from `space`.")
    space: dict = field(
        default_factory=dict,
        metadata={"help": "Search space: field -> {log_uniform|uniform|int: [lo, hi]} or {choice: [...]}."},
    )


FIELDS = {f.name: f for f in fields(Recipe)}
# Options an entry point exposes: every field but the search space, which lives in the YAML.
OPTION_FIELDS = [f for f in fields(Recipe) if f.name != "space"]
DISTRIBUTIONS = ("log_uniform", "uniform", "int", "choice")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert `value` to the type of field `key`, or raise naming the key and where it came from."""
    if key not in FIELDS:
        close = [k for k in FIELDS if k.startswith(key[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SoupsError(f"unknown recipe key {key!r} in {where}{hint}")
    return coerce(FIELDS[key], value, where)


def draw(space: dict, i: int) -> dict[str, Any]:
    """Hyperparameters of sweep member `i`: the same i gives the same values on every machine."""
    rng = np.random.default_rng(i)
    out = {}
    for key in sorted(space):  # fixed order: adding a key never reshuffles by dict order
        spec = space[key]
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SoupsError(f"space.{key} must be one of {{{'|'.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            value = arg[int(rng.integers(len(arg)))]
        else:
            lo, hi = (float(a) for a in arg)
            if kind == "log_uniform":
                value = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            elif kind == "uniform":
                value = float(rng.uniform(lo, hi))
            else:
                value = int(rng.integers(int(lo), int(hi) + 1))
        out[key] = _coerce(key, value, f"space.{key}")
    return out


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Resolve a recipe: defaults <- YAML file <- draw(space, i) <- explicit overrides.

    Overrides whose value is None are ignored (an option the user did not give)."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise SoupsError(f"recipe {path} not found (pass an existing YAML file as `recipe`)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SoupsError(f"recipe {path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise SoupsError(f"recipe {path} must be a mapping of keys to values")
        values = {k: _coerce(k, v, f"recipe {path}") for k, v in raw.items()}
    given = {k: _coerce(k, v, "parameter") for k, v in (overrides or {}).items() if v is not None}
    i = given.get("i", values.get("i", 0))
    if i < 0:
        raise SoupsError(f"parameter i={i} must be >= 0 (it indexes the sweep member)")
    space = given.get("space", values.get("space", {}))
    return Recipe(**{**values, **draw(space, i), **given})


def run_name(role: str, recipe: Recipe) -> str:
    """`finetune i=3 lr=1.2e-03`, `start ft 3 ep`: what a person looks for in the runs table."""
    if role == "start":
        return f"start {'ft' if recipe.start_mode == 'finetune' else 'probe'} {recipe.epochs} ep"
    return f"finetune i={recipe.i} lr={recipe.lr:.1e}"


def loader_settings(recipe: Recipe) -> LoaderSettings:
    """What the training loader reads of a recipe (its fields bear the recipe's names)."""
    from soups.batches import LoaderSettings  # the loader's torch stack, only when one is made

    return LoaderSettings(**{f.name: getattr(recipe, f.name) for f in fields(LoaderSettings)})


def load_splits(recipe: Recipe) -> Splits:
    """The recipe's data read by its layout and split (`data.make_splits`)."""
    options = {k: getattr(recipe, k) for k in option_names()}
    parts = read_layout(recipe.layout, recipe.data, **options)
    return make_splits(
        parts,
        recipe.val_ratio,
        recipe.test_ratio,
        recipe.split_seed,
        recipe.max_train,
        recipe.max_val,
        recipe.max_test,
    )


def registered_name(recipe: Recipe) -> str:
    """The registry name of a recipe's soups: its own, else `<data folder name>-soup`, so that a
    recipe pointed at other data never writes into the demo's model."""
    from soups.data import data_name

    return recipe.registered_model or f"{data_name(recipe.data)}-soup"


def params(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as flat run params (the search space is logged as the YAML instead)."""
    return {f.name: getattr(recipe, f.name) for f in OPTION_FIELDS}


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)


def from_params(logged: dict[str, str], overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe a run was trained with, rebuilt from its params (what the run recorded is the
    truth downstream), with explicit overrides such as a `data` folder that moved."""
    known = {f.name for f in OPTION_FIELDS}
    return load_recipe(None, {**{k: v for k, v in logged.items() if k in known}, **(overrides or {})})
