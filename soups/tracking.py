"""The MLflow contract (../DESIGN.md): the one module that knows MLflow's API and every name the
steps share (params, metrics, tags, artifact paths). Nothing else in soups imports mlflow."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError

log = logging.getLogger(__name__)

# Tags
ROLE = "soups.role"  # pretrain | ingredient | evaluation | soup | inference | sweep
SPLIT = "soups.split"  # fingerprint of the held-out file lists
SHA256 = "soups.sha256"  # of the checkpoint artifact
# Artifacts
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT = f"{CHECKPOINT_DIR}/model.pt"
RECIPE = "recipe.yaml"
# Ranking metric and the per-epoch metrics of an ingredient run (step = epoch)
RANK_METRIC = "val_accuracy"
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_f1", "images_per_s")

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
MAX_PARAM_LENGTH = 6000

QUIET_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure() -> str:
    """Pick the tracking URI (MLFLOW_TRACKING_URI, else ./mlflow.db), quiet MLflow down, and make
    sure a SQLite store exists before anything else uses it. Returns the URI."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    create_store(uri)
    return uri


def create_store(uri: str) -> None:
    """Create a SQLite tracking store once, under a file lock: several processes migrating a fresh
    store at the same time crash in MLflow's schema migration."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.is_file() and db.stat().st_size > 0:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(name: str) -> str:
    """Id of experiment `name`, creating it if needed (a concurrent creator wins harmlessly)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SoupsError(
                f"experiment {name!r} is deleted: restore it (`mlflow experiments restore`) "
                "or pick another name"
            )
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Run:
    """The active run, with the few things the steps log into it."""

    def __init__(self, run_id: str):
        self.id = run_id
        self.client = MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params that the run does not hold yet. `mlflow run` has already logged the `-P`
        values as typed (`1e-3`, quoted paths); re-logging a param with another string raises."""
        held = self.client.get_run(self.id).data.params
        items = [
            mlflow.entities.Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in held
        ]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_recipe(self, text: str) -> None:
        mlflow.log_text(text, RECIPE)

    def log_split(self, fingerprint: str) -> None:
        mlflow.set_tag(SPLIT, fingerprint)

    def log_checkpoint(self, path: Path, sha256: str) -> None:
        """Upload `path` as `checkpoint/model.pt`, then tag its sha256: a run carries the tag only
        once its checkpoint is whole."""
        if Path(path).name != Path(CHECKPOINT).name:
            raise ValueError(f"checkpoint file must be named {Path(CHECKPOINT).name}")
        mlflow.log_artifact(str(path), CHECKPOINT_DIR)
        mlflow.set_tag(SHA256, sha256)


@contextmanager
def start(role: str, experiment: str) -> Iterator[Run]:
    """Attach to the run `mlflow run` created (MLFLOW_RUN_ID), or start one in `experiment`.
    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    configure()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:  # under `mlflow run`: never set_experiment here, it raises
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(experiment_id=experiment_id(experiment))
    try:
        mlflow.set_tag(ROLE, role)
        yield Run(active.info.run_id)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def fetch(uri: str, dst: Path | None = None) -> Path:
    """A local file for an MLflow URI: `runs:/<id>/<path>`, `mlflow-artifacts:/…`, or a registered
    model `models:/<name>@<alias>` / `models:/<name>/<version>` (its run's checkpoint)."""
    configure()
    dst = Path(dst or tempfile.mkdtemp(prefix="soups-"))
    if uri.startswith("models:/"):
        uri = f"runs:/{model_version(uri).run_id}/{CHECKPOINT}"
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise SoupsError(f"cannot download {uri}: {str(e).splitlines()[0]}") from None


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
    except MlflowException as e:
        raise SoupsError(
            f"{uri} does not resolve ({str(e).splitlines()[0]}); list models with "
            "`mlflow models list` or in `mlflow ui` under Models"
        ) from None


def is_mlflow_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


def ingredient_filter(extra: str | None = None) -> str:
    """Finished ingredient runs, optionally narrowed by another `search_runs` clause (MLflow
    filters know `and` only)."""
    clauses = [f"tags.`{ROLE}` = 'ingredient'", "attributes.status = 'FINISHED'"]
    return " and ".join(clauses + ([extra] if extra else []))


def ranked_ingredients(experiment: str, extra_filter: str | None = None, limit: int | None = None) -> list:
    """Finished ingredient runs of `experiment`, best `val_accuracy` first, ranked by the server
    (paged: more than 1,000 runs are fine)."""
    configure()
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        raise SoupsError(f"experiment {experiment!r} not found on {mlflow.get_tracking_uri()}")
    runs, token = [], None
    while True:
        page = MlflowClient().search_runs(
            [exp.experiment_id],
            filter_string=ingredient_filter(extra_filter),
            order_by=[f"metrics.{RANK_METRIC} DESC", "attributes.start_time ASC"],
            max_results=min(1000, limit - len(runs)) if limit else 1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token or (limit and len(runs) >= limit):
            return runs


def ingredient_table(runs: list) -> list[dict[str, Any]]:
    """One row per run for people: its index, hyperparameters and scores."""
    keys = ("i", "model", "lr", "weight_decay", "epochs", "aug", "label_smoothing")
    return [
        {"run_id": r.info.run_id[:8], **{k: r.data.params.get(k) for k in keys},
         RANK_METRIC: r.data.metrics.get(RANK_METRIC),
         "minutes": ((r.info.end_time or 0) - r.info.start_time) / 60000}
        for r in runs
    ]  # fmt: skip
