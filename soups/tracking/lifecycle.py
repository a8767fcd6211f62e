"""A run's life: the experiment it lives in (created when missing), its start under `mlflow run`
or on its own, its name and description, and how it ends (FINISHED, FAILED, KILLED)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError, Stopped
from soups.tracking.liveness import heartbeat_interval
from soups.tracking.names import (
    EXPERIMENT_KIND,
    HEARTBEAT,
    HEARTBEAT_EVERY,
    HOLDS_SECRET,
    NOTE,
    ROLE,
    STOPPED,
)
from soups.tracking.resume import reopen
from soups.tracking.runs import Run
from soups.tracking.server import checked_run_id, configure, is_conflict, shown

log = logging.getLogger(__name__)


def ensure_experiment(name: str) -> str:
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


@contextmanager
def start(
    role: str,
    experiment: str,
    parent: Run | None = None,
    tags: dict | None = None,
    *,
    name: str = "",
    system_metrics: bool = False,
    experiment_note: str = "",
    resume: str = "",
    claimed: str = "",
) -> Iterator[Run]:
    """Attach to the run `mlflow run` created (MLFLOW_RUN_ID), or start one in `experiment`; with
    `parent`, start a child run in the parent's experiment. The run is named `name` unless the
    user named it (`mlflow run --run-name`); with `system_metrics`, MLflow samples CPU, memory and
    GPU use while it runs. An experiment without a description gets `experiment_note`. The run
    ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or when training was stopped early
    (`soups.Stopped`). With `resume`, that run is reopened instead and keeps its name; with
    `claimed`, the run this process created beforehand (a start it claimed) is the one."""
    configure()
    project_run = os.environ.get("MLFLOW_RUN_ID")
    run_id = claimed or (None if parent else project_run)
    kw = {"log_system_metrics": True} if system_metrics else {}
    if resume:
        active, run_id, name = reopen(resume, **kw), resume, ""
    elif run_id:  # under `mlflow run`: never set_experiment here, it raises
        active = mlflow.start_run(run_id=run_id, **kw)
    elif parent:
        active = mlflow.start_run(
            experiment_id=parent.experiment_id, parent_run_id=parent.id, run_name=name or None, **kw
        )
    else:
        active = mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=name or None, **kw)
    try:
        yield from _started(active, role, tags, run_id, name, experiment_note)
    finally:
        if claimed and project_run:
            # MLflow's end_run forgets the run `mlflow run` made for this process: the member that
            # made this start (start: auto) still logs into that run, in that run's experiment.
            os.environ["MLFLOW_RUN_ID"] = project_run


def _started(active, role: str, tags: dict | None, run_id: str | None, name: str, note: str) -> Iterator[Run]:
    """The body of `start` once MLflow's run is active: tag, name and describe it, then end it
    with the status the step's outcome says."""
    try:
        mlflow.set_tags({ROLE: role, **(tags or {})})
        run = Run(active.info.run_id, named_by_user=bool(run_id) and not generated_name(active.info.run_name))
        if name:
            run.rename(name)
        describe_experiment(active.info.experiment_id, note)
        yield run
    except Stopped as e:
        _end("KILLED", {STOPPED: str(e)})
        raise
    except KeyboardInterrupt:
        _end("KILLED")
        raise
    except BaseException:
        _end("FAILED")
        raise
    with _uninterrupted():
        mlflow.end_run("FINISHED")


def start_step(
    role: str,
    recipe,
    name: str,
    parent: Run | None = None,
    tags: dict | None = None,
    resume: str = "",
    claimed: str = "",
):
    """`start` for a step's run from its recipe: the recipe's experiment, its description for the
    experiment and its choice of system metrics."""
    return start(
        role,
        recipe.experiment,
        parent,
        tags,
        name=name,
        system_metrics=recipe.system_metrics,
        experiment_note=recipe.description,
        resume=resume,
        claimed=claimed,
    )


def step_experiment(name: str, parent: Run | None = None) -> str:
    """The experiment a step's run will be in, before it exists: its parent's, the one `mlflow
    run` chose, or `name` (created when missing)."""
    configure()
    if parent is not None:
        return parent.experiment_id
    if os.environ.get("MLFLOW_RUN_ID"):
        return MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    return ensure_experiment(name)


@contextmanager
def heartbeat(run_id: str, every: float | None = None) -> Iterator[None]:
    """Keep tag `soups.heartbeat` of a run fresh from a background thread while the body runs, so
    that others can tell a live run from one whose process is gone (a claimed start, a run asked
    to resume). The interval (`SOUPS_HEARTBEAT_S`, 30 s) is tagged with it."""
    stop = threading.Event()
    every = every or heartbeat_interval()

    def beat() -> None:
        client = MlflowClient()
        first = True
        while True:  # the first beat at once: a run's start time (or an old beat) may be long past
            try:
                if first:
                    client.set_tag(run_id, HEARTBEAT_EVERY, f"{every:g}")
                    first = False
                client.set_tag(run_id, HEARTBEAT, str(time.time()))
            except Exception as e:  # a lost beat is no reason to stop training
                log.debug("heartbeat of run %s not written: %s", run_id, e)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def describe_experiment(experiment_id: str, note: str) -> None:
    """Give an experiment its description and open it in the UI's model-training view, unless it
    has them already (a description someone wrote is never replaced)."""
    client = MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    wanted = {NOTE: note} if note and not tags.get(NOTE) else {}
    if EXPERIMENT_KIND not in tags:
        wanted[EXPERIMENT_KIND] = "custom_model_development"
    for key, value in wanted.items():
        try:
            client.set_experiment_tag(experiment_id, key, value)
        except MlflowException as e:
            # Another process described it at the same moment (MLflow's read-then-insert lost the
            # race): theirs stands, as any description already there does.
            if not is_conflict(e):
                raise


def generated_name(name: str | None) -> bool:
    """Whether a run name is one MLflow made up (`calm-hound-118`), not one a person gave."""
    if not name:
        return True
    parts = name.split("-")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:  # the word lists moved: fall back to the shape alone
        return parts[0].isalpha() and parts[1].isalpha()
    return parts[0] in _GENERATOR_PREDICATES and parts[1] in _GENERATOR_NOUNS


def _end(status: str, tags: dict | None = None) -> None:
    """End the active run after a failure, with the tags that say why. When the server cannot be
    reached the run stays RUNNING there (never an ingredient) and the original error is the one
    the user sees."""
    try:
        with _uninterrupted():
            if tags:
                mlflow.set_tags(tags)
            mlflow.end_run(status)
    except Exception as e:  # the server is gone: say so, do not mask the error that ended the run
        log.warning("could not mark the run %s on %s: %s", status, shown(), str(e).splitlines()[0])


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """SIGTERM ignored while a run's end is written: torchrun stops the other ranks with it right
    after one dies, and one arriving in the middle of `end_run` (rank 0 already failing on the
    lost peer) left the run RUNNING. The process is ending anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def take_project_run() -> str | None:
    """The run `mlflow run` created for this process, taken out of the environment so that the
    runs this process starts itself (sweep trials) never attach to it."""
    configure()
    return os.environ.pop("MLFLOW_RUN_ID", None)


def abandon(run_id: str, why: str) -> None:
    """Mark a run whose process is gone FAILED (it never logged a checkpoint), with the reason."""
    client = MlflowClient()
    try:
        if client.get_run(checked_run_id(run_id)).info.status == "RUNNING":
            client.set_tag(run_id, STOPPED, why)
            client.set_terminated(run_id, "FAILED")
    except MlflowException as e:
        log.warning("could not mark run %s FAILED: %s", run_id, str(e).splitlines()[0])


def flag_project_run(why: str) -> str | None:
    """Tag the run `mlflow run` made for this process as holding a secret in its params (MLflow
    cannot take a param back, and `mlflow run` must still end the run); returns its id."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        MlflowClient().set_tag(run_id, HOLDS_SECRET, why)
    return run_id
