"""The model registry: a soup logged as an MLflow model and registered with its lineage, the
`champion` alias moved only when it wins, and `models:/` references resolved."""

from __future__ import annotations

import base64
import importlib.metadata
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from packaging.version import Version
from PIL import Image

from soups import SoupsError
from soups.tracking.names import (
    CHAMPION,
    CONSIDERED_RUNS,
    CONTINUED_FROM,
    INGREDIENT_RUNS,
    INGREDIENTS,
    MAX_NOTE_LENGTH,
    METHOD,
    MODEL_NAME,
    NEW_RUNS,
    PENDING,
    PROMOTION,
    RANK_METRIC,
    SOUP_RUN,
    SPLIT,
    START,
    START_RUN,
    TEST_METRIC,
)
from soups.tracking.promotion import Rival, promote, unscored
from soups.tracking.server import shown


@dataclass(frozen=True)
class Lineage:
    """Where a registered soup came from, as tags on its model version."""

    soup_run: str
    method: str
    ingredients: list[str]
    start: str
    start_run: str
    split: str
    val_accuracy: float
    test_accuracy: float | None
    considered: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    continued_from: str = ""

    def tags(self) -> dict[str, str]:
        return {
            SOUP_RUN: self.soup_run,
            METHOD: self.method,
            INGREDIENT_RUNS: run_list(self.ingredients),
            CONSIDERED_RUNS: run_list(self.considered),
            NEW_RUNS: run_list(self.new),
            CONTINUED_FROM: self.continued_from,
            START: self.start,
            START_RUN: self.start_run,
            SPLIT: self.split,
            RANK_METRIC: f"{self.val_accuracy:.4f}",
            TEST_METRIC: "" if self.test_accuracy is None else f"{self.test_accuracy:.4f}",
        }


def run_list(run_ids: list[str], limit: int = MAX_NOTE_LENGTH) -> str:
    """Run ids comma-separated, whole ids only: past `limit` characters the rest is counted."""
    whole = ",".join(run_ids)
    if len(whole) <= limit:
        return whole
    kept: list[str] = []
    more = lambda n: f",+{n} more (the soup run's {INGREDIENTS})"  # noqa: E731
    while len(",".join([*kept, run_ids[len(kept)]])) + len(more(len(run_ids) - len(kept) - 1)) <= limit:
        kept.append(run_ids[len(kept)])
    return ",".join(kept) + more(len(run_ids) - len(kept))


# What the served model imports (soups' own code travels with it as code), pinned to the versions
# that made it. Listed, not inferred: MLflow's inference loads the model in a subprocess (7 s of
# every soup step) and then named mlflow, numpy, pandas and an uninstallable `soups==0.1.0`,
# neither torch nor timm.
SERVED_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyyaml", "tqdm")


def served_requirements() -> list[str]:
    # public versions: a local label (torch 2.14.1+cpu from PyTorch's own index) installs from nowhere
    return [f"{p}=={Version(importlib.metadata.version(p)).public}" for p in SERVED_PACKAGES]


# What the served soup takes and answers, as MLflow's own flavours declare it: the model page shows
# it, and the scoring server refuses a request without the `image` column before the model runs.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema(
        [ColSpec("long", "label"), ColSpec("string", "class_name"), ColSpec("double", "probability")]
    ),
)


def input_example() -> pd.DataFrame:
    """One request the served soup answers: a grey 32 x 32 PNG, base64-encoded."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def register(
    checkpoint: Path,
    name: str,
    val_accuracy: float,
    split: str,
    lineage: Lineage | None = None,
    note: str = "",
    judge: Callable[[], Rival | None] | None = None,
) -> tuple[int, str]:
    """Log the soup as an MLflow model serving images (in the active run), register it as a
    version of `name` with its lineage and description, and move alias `champion` to it when it
    beats the champion on val as `judge` scores it on the same images, when its turn comes (see
    `promote`; no judge: the champion stays). Returns the version and what happened to the alias."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(Path(__file__).parent / "served_model.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parents[1])],
        pip_requirements=served_requirements(),
        signature=SIGNATURE,
        input_example=input_example(),
    )
    # Registered with its lineage and a pending promotion in the one call that creates the version
    # (the server numbers versions atomically): a concurrent soup step sees it pending at once.
    tags = {k: v[:MAX_NOTE_LENGTH] for k, v in (lineage.tags() if lineage else {}).items()}
    version = int(mlflow.register_model(info.model_uri, name, tags={**tags, PROMOTION: PENDING}).version)
    outcome = promote(name, version, val_accuracy, split, judge or (lambda: unscored(name)))
    client = MlflowClient()  # descriptions after the promotion: nothing may hold a version pending
    if note:
        client.update_model_version(name, str(version), description=note[:MAX_NOTE_LENGTH])
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=f"Model soups made by soups; `models:/{name}@{CHAMPION}` is the best on val.",
        )
    return version, outcome


def model_version(uri: str):
    """The registry entry behind `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        return client.get_model_version(name, version)
    except MlflowException:
        known = [
            f"{m.name} ({', '.join(f'@{a}' for a in m.aliases) or 'no alias'})"
            for m in client.search_registered_models(max_results=20)
        ]
        listing = "; ".join(known) if known else "none"
        raise SoupsError(f"{uri} does not resolve on {shown()}; registered models: {listing}") from None
