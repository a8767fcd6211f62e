"""Checkpoints behind runs and models: downloaded once into a local cache by run id, checked
against the run's sha256 tag, and any model reference (file, `runs:/`, `models:/`) made a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.models import cache_home, sha256
from soups.tracking.names import CHECKPOINT, CHECKPOINT_FILE, SHA256
from soups.tracking.registry import model_version
from soups.tracking.search import get_run
from soups.tracking.server import checked_run_id, configure


def cache_root() -> Path:
    return cache_home() / "checkpoints"


def cached_checkpoint(run) -> tuple[Path, bool]:
    """The checkpoint of ingredient `run`, downloaded once into the cache by run id and checked
    against the run's sha256 tag. Returns the path and whether it was downloaded now."""
    rid = checked_run_id(run.info.run_id)
    digest = run.data.tags.get(SHA256)
    if not digest:
        raise SoupsError(f"run {rid} has no {SHA256} tag: its checkpoint was never completed")
    dst = cache_root() / rid / CHECKPOINT_FILE
    if dst.is_file() and sha256(dst) == digest:
        return dst, False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        try:
            got = Path(MlflowClient().download_artifacts(rid, CHECKPOINT, tmp))
        except (MlflowException, OSError) as e:
            raise SoupsError(
                f"checkpoint of run {rid} cannot be downloaded: {str(e).splitlines()[0]}"
            ) from None
        if (actual := sha256(got)) != digest:
            raise SoupsError(
                f"checkpoint of run {rid} has sha256 {actual[:12]}…, its tag says {digest[:12]}…: "
                "replaced or corrupted after logging"
            )
        os.replace(got, dst)
    return dst, True


def checkpoint_for(uri: str) -> Path:
    """A local soups checkpoint for a model reference: a `.pt` file, `runs:/<id>[/<path>]`,
    `models:/<name>@<alias>` or `models:/<name>/<version>` (the checkpoint of the version's run).
    Run checkpoints come through the sha256-checked cache."""
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if path.is_file():
            return path
        raise SoupsError(
            f"model {uri!r} not found: give models:/<name>@<alias>, models:/<name>/<version>, "
            "runs:/<run id> or a checkpoint file"
        )
    configure()
    if uri.startswith("models:/"):
        return cached_checkpoint(get_run(model_version(uri).run_id))[0]
    if uri.startswith("runs:/"):
        rid, _, artifact = uri.removeprefix("runs:/").partition("/")
        if artifact.strip("/") in ("", CHECKPOINT):
            return cached_checkpoint(get_run(rid))[0]
    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="soups-"))
        )
    except (MlflowException, OSError) as e:
        raise SoupsError(f"cannot download {uri}: {str(e).splitlines()[0]}") from None


def is_mlflow_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))
