"""A sweep's parent run in MLflow: created by the study's creator, labelled, and given the study's
setup, its best trial and Optuna's plots."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from soups.tracking.lifecycle import generated_name
from soups.tracking.names import (
    BEST_PARAM_PREFIX,
    BEST_TRIAL_RUN,
    OPTUNA_PLOTS,
    ROLE,
    START_PARAM,
    STUDY,
    SWEEP_PARENT,
)
from soups.tracking.runs import Run


def sweep_parent(own_run: str | None, experiment_id: str, study: str, trials: int = 0) -> Run:
    """The sweep's parent run: the run `mlflow run` made for this worker, or a new one."""
    client = MlflowClient()
    name = f"sweep {study}" + (f" {trials} trials" if trials else "")
    run_id = own_run or client.create_run(experiment_id, run_name=name).info.run_id
    run = Run(run_id, named_by_user=not generated_name(client.get_run(run_id).info.run_name))
    run.rename(name)
    run.set_tags({ROLE: "sweep", STUDY: study})
    return run


def mark_sweep_worker(run_id: str, parent_id: str) -> None:
    """Another worker's own `mlflow run` run: labelled, so that nobody takes it for the sweep."""
    Run(run_id).set_tags({ROLE: "sweep-worker", SWEEP_PARENT: parent_id})


def log_sweep_setup(parent: Run, params: dict, start: str) -> None:
    """The sweep's options and the start every trial loads."""
    parent.log_params({**params, START_PARAM: start})


def log_sweep_best(parent: Run, value: float, number: int, run_id: str, params: dict) -> None:
    """The best trial: its val accuracy and number, its run and what it drew. Every worker that
    sees the study complete writes it, maybe at the same moment: both are batch writes, which
    MLflow retries when two processes insert the same row."""
    parent.log_metrics({"best_val_accuracy": value, "best_trial": number})
    parent.set_tags({BEST_TRIAL_RUN: run_id, **{f"{BEST_PARAM_PREFIX}{k}": v for k, v in params.items()}})


def log_sweep_plot(parent: Run, name: str, html: str) -> None:
    parent.log_text(html, f"{OPTUNA_PLOTS}/{name}.html")
