"""The layout registry: what a layout declares (`Layout`, `Attributes`), `register`, and the
lookups the rest of soups asks of a layout by name. Each layout's file imports this module, and
the package imports every layout file: no module imports the package it belongs to."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from soups import SoupsError
from soups.layouts.files import unlabelled
from soups.samples import Samples, data_root


@dataclass(frozen=True)
class Attributes:
    """Labels that combine several attributes (the mask layout: mask x gender x age). Steps score
    each attribute on its own and `vote=attributes` votes each separately."""

    names: tuple[str, ...]
    split: Callable[[np.ndarray], dict[str, np.ndarray]]  # labels -> {attribute: values}
    join: Callable[..., np.ndarray]  # values of each attribute, in `names` order -> labels


@dataclass(frozen=True)
class Layout:
    name: str
    help: str  # one line: the folder structure it reads
    read: Callable[..., dict]  # (root, **options) -> {"pool": Samples, "val": ..., "test": ...}
    # Images of its own that `infer` predicts by default, (root, classes) -> Samples: the mask
    # competition's unlabelled eval/ folder. None: the test split of the data the model was
    # trained on, the only images a score called "test" may be measured on.
    inputs: Callable[[Path, list[str]], Samples] | None = None
    attributes: Attributes | None = None
    # The layout's own submission format (one row per image in input order), else soups' CSV.
    submission: Callable[[Samples, list[int]], pd.DataFrame] | None = None

    @property
    def options(self) -> dict[str, object]:
        """Recipe fields this layout reads, with their defaults (the reader's keyword arguments)."""
        params = list(inspect.signature(self.read).parameters.values())[1:]
        return {p.name: p.default for p in params}


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


def get(name: str) -> Layout:
    if name not in LAYOUTS:
        raise SoupsError(f"unknown layout {name!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def option_names() -> set[str]:
    """Every recipe field some layout reads (age_bins, relabel...)."""
    return {k for layout in LAYOUTS.values() for k in layout.options}


def read_layout(name: str, data: str | Path, **options) -> dict:
    """Read a dataset with its layout. An option that belongs to another layout is refused when it
    is set to anything but its default (a relabel file given to an image folder would silently
    do nothing)."""
    layout = get(name)
    for key, value in options.items():
        if key in layout.options:
            continue
        owners = [o for o in LAYOUTS.values() if key in o.options]
        if owners and value and value != owners[0].options[key]:
            raise SoupsError(f"{key} applies to the {owners[0].name} layout, not {name}")
    given = {k: v for k, v in options.items() if k in layout.options and v not in ("", None)}
    return {**layout.read(data_root(data), **given), "layout": name}  # errors name it


def inference_inputs(layout: str, data: str | Path, classes: list[str]) -> Samples | None:
    """The images `layout` names for `infer` under `data` (mask: eval/), or None: infer then
    predicts the test split of the model's data."""
    inputs = get(layout).inputs
    return None if inputs is None else inputs(data_root(data), classes)


def every_image(data: str | Path, classes: list[str]) -> Samples:
    """Every image under the data root, whatever its layout (infer's whole_folder): it may hold
    the images a model trained on."""
    return unlabelled(data_root(data), classes)
