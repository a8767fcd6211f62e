"""The model registry: a soup logged as an MLflow model and registered with its lineage, the
`champion` alias moved only when it wins, and `models:/` references resolved."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from packaging.version import Version

from soups import SoupsError
from soups.tracking.names import (
    CHAMPION,
    CHAMPION_WHY,
    INGREDIENT_RUNS,
    MAX_NOTE_LENGTH,
    METHOD,
    MODEL_NAME,
    RANK_METRIC,
    SOUP_RUN,
    SPLIT,
    START,
    START_RUN,
    TEST_METRIC,
)


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

    def tags(self) -> dict[str, str]:
        return {
            SOUP_RUN: self.soup_run,
            METHOD: self.method,
            INGREDIENT_RUNS: ",".join(self.ingredients),
            START: self.start,
            START_RUN: self.start_run,
            SPLIT: self.split,
            RANK_METRIC: f"{self.val_accuracy:.4f}",
            TEST_METRIC: "" if self.test_accuracy is None else f"{self.test_accuracy:.4f}",
        }


@dataclass(frozen=True)
class Rival:
    """The champion a new soup is compared with: its version and its val accuracy as the soup step
    measured it on the soup's own images with the same treatment (None: it could not be, `why`)."""

    version: str
    val_accuracy: float | None
    why: str = ""


def champion(name: str):
    """The version `name@champion` points at, or None when there is none yet. Only "no such model
    or alias" means none: any other failure (a 401, a 5xx, a timeout) is an error, so that a read
    that failed never lets a soup overwrite the alias."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        # MLflow says "alias not found" as INVALID_PARAMETER_VALUE, a missing model as
        # RESOURCE_DOES_NOT_EXIST: either means no champion, nothing else does.
        missing = e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)
        )
        if missing:
            return None
        raise SoupsError(
            f"could not read {name}@{CHAMPION} on {mlflow.get_tracking_uri()}: {str(e).splitlines()[0]}"
        ) from None


# What the served model imports (soups' own code travels with it as code), pinned to the versions
# that made it. Listed, not inferred: MLflow's inference loads the model in a subprocess (7 s of
# every soup step) and then named mlflow, numpy, pandas and an uninstallable `soups==0.1.0`,
# neither torch nor timm.
SERVED_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pyyaml", "tqdm")


def served_requirements() -> list[str]:
    # public versions: a local label (torch 2.14.1+cpu from PyTorch's own index) installs from nowhere
    return [f"{p}=={Version(importlib.metadata.version(p)).public}" for p in SERVED_PACKAGES]


def register(
    checkpoint: Path,
    name: str,
    val_accuracy: float,
    split: str,
    lineage: Lineage | None = None,
    note: str = "",
    rival: Rival | None = None,
) -> tuple[int, str]:
    """Log the soup as an MLflow model serving images (in the active run), register it as a
    version of `name` with its lineage and description, and move alias `champion` to it when it
    beats `rival` (the champion, scored on the same images) on val. Returns the version and what
    happened to the alias."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(Path(__file__).parent / "served_model.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parents[1])],
        pip_requirements=served_requirements(),
        registered_model_name=name,
    )
    version = int(info.registered_model_version)
    client = MlflowClient()
    if note:
        client.update_model_version(name, str(version), description=note[:MAX_NOTE_LENGTH])
    for key, value in (lineage.tags() if lineage else {}).items():
        client.set_model_version_tag(name, str(version), key, value[:MAX_NOTE_LENGTH])
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=f"Model soups made by soups; `models:/{name}@{CHAMPION}` is the best on val.",
        )
    return version, promote(name, version, val_accuracy, split, rival)


def promote(name: str, version: int, val_accuracy: float, split: str, rival: Rival | None) -> str:
    """Move alias `champion` of `name` to `version` when there is none, or when it beats the
    champion's val accuracy measured on the same images (a tie keeps the champion). The alias is
    read again just before it moves: a champion that changed since the soup step scored it (another
    soup step finished meanwhile) is never overwritten without a comparison."""
    client = MlflowClient()

    def move(why: str) -> str:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        client.set_model_version_tag(name, str(version), CHAMPION_WHY, why)
        return why

    current = champion(name)
    if current is None:  # none, or the alias was removed since the soup step looked
        why = move(f"the first {CHAMPION} (val {val_accuracy:.4f} on split {split})")
        return f"{name} version {version} is {why}"
    if rival is None or str(current.version) != str(rival.version):
        return f"{name}@{CHAMPION} stays version {current.version}: it became champion while this soup cooked"
    if rival.val_accuracy is None:
        return (
            f"{name}@{CHAMPION} stays version {rival.version}: {rival.why} (move it by hand if you mean to)"
        )
    if val_accuracy > rival.val_accuracy:
        why = move(
            f"val {val_accuracy:.4f} beats version {rival.version}'s {rival.val_accuracy:.4f}, both scored "
            f"on the same images of split {split}"
        )
        return f"{name}@{CHAMPION} moved to version {version}: {why}"
    return (
        f"{name}@{CHAMPION} stays version {rival.version}: val {rival.val_accuracy:.4f} >= this soup's "
        f"{val_accuracy:.4f} on the same images"
    )


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
        raise SoupsError(
            f"{uri} does not resolve on {mlflow.get_tracking_uri()}; registered models: {listing}"
        ) from None
