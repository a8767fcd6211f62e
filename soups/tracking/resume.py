"""Resuming a run in place: its latest full training state kept as an artifact every few epochs,
and a run that died (SIGKILL, preemption, a lost server) reopened under its own id."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import torch
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.liveness import heartbeat_interval, signs_of_life
from soups.tracking.names import (
    HEARTBEAT,
    HEARTBEAT_EVERY,
    NOTE,
    RESUME_CLAIM,
    RESUMED,
    ROLE,
    STATE_EPOCH,
    STOPPED,
    TRAINING_STATE,
    run_link,
)
from soups.tracking.runs import Run
from soups.tracking.search import get_run
from soups.tracking.server import raising_unreachable

RESUMABLE = ("ingredient", "start")


def keep_training_state(run: Run, state: dict, epoch: int) -> None:
    """Replace the run's training state with `state` (after `epoch`); the tag moves only once the
    artifact is whole, so a kill mid-upload leaves the previous state the one to resume."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TRAINING_STATE).name
        torch.save(state, path)
        with raising_unreachable():
            run.client.log_artifact(run.id, str(path), str(Path(TRAINING_STATE).parent))
            run.client.set_tag(run.id, STATE_EPOCH, str(epoch))


def resumable(run_id: str, reopened: bool = False):
    """The run to continue, or a one-line reason it cannot be (`reopened`: this process reopened
    it already, so its own heartbeat is no other process's sign of life)."""
    run = get_run(run_id)
    role, status = run.data.tags.get(ROLE), run.info.status
    if role not in RESUMABLE:
        raise SoupsError(
            f"resume={run_id}: a {role or 'non-soups'} run, only {' or '.join(RESUMABLE)} runs resume"
        )
    if status == "FINISHED":
        raise SoupsError(f"resume={run_id}: the run FINISHED; nothing is left to train")
    if not reopened and (alive := signs_of_life(run)):  # two processes would train and upload into one run
        who = "the run is RUNNING and its process" if status == "RUNNING" else "a process resuming the run"
        raise SoupsError(
            f"resume={run_id}: {who} said it was alive {alive[0]:.0f} s ago; if that process is "
            f"gone, resume again in {alive[1]:.0f} s"
        )
    if STATE_EPOCH not in run.data.tags:
        raise SoupsError(
            f"resume={run_id}: the run kept no training state (fine-tune with -P save_every=K to keep one)"
        )
    return run


def training_state(run_id: str) -> dict:
    """The run's latest training state (weights, optimizer, schedule, random state, best epoch)."""
    run = resumable(run_id, reopened=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient().download_artifacts(run.info.run_id, TRAINING_STATE, tmp)
        except (MlflowException, OSError) as e:
            raise SoupsError(
                f"resume={run_id}: training state cannot be downloaded: {str(e).splitlines()[0]}"
            ) from None
        return torch.load(path, map_location="cpu", weights_only=True)


CLAIM_SETTLE_S = 2.0  # how long a resuming process waits for one that resumed at the same moment


def claim(run_id: str) -> None:
    """Make this process the only one to resume `run_id`. Two processes that find the same dead
    run at the same moment would both pass `resumable`: each writes its token with a fresh
    heartbeat in one batch, waits, and reads the token back; only the last writer finds its own.
    A process arriving later sees the fresh beat and is refused by `resumable` like a live run."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    beat = [RunTag(HEARTBEAT, str(time.time())), RunTag(HEARTBEAT_EVERY, f"{heartbeat_interval():g}")]
    with raising_unreachable():
        MlflowClient().log_batch(run_id, tags=[RunTag(RESUME_CLAIM, token), *beat])
    time.sleep(CLAIM_SETTLE_S)
    theirs = get_run(run_id).data.tags.get(RESUME_CLAIM)
    if theirs != token:
        raise SoupsError(
            f"resume={run_id}: another process ({theirs}) resumed the run at the same moment; it "
            "trains, this one stops"
        )


def reopen(run_id: str, **kw):
    """Start `run_id` again (MLflow sets it RUNNING), once this process holds the claim. The run
    `mlflow run` made for this process, if any, is labelled as the one that resumed it, and left
    for `mlflow run` to end."""
    run = resumable(run_id)
    claim(run_id)
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher and launcher != run_id:
        client = MlflowClient()
        client.set_tag(launcher, ROLE, "resume")
        client.set_tag(launcher, RESUMED, run_id)
        client.set_tag(launcher, NOTE, f"Resumed {run_link(run_id, run.info.experiment_id)} in place.")
        client.update_run(launcher, name=f"resume {run_id[:8]}")
    if STOPPED in run.data.tags:  # why it stopped last time (a lost heartbeat) no longer holds
        MlflowClient().delete_tag(run_id, STOPPED)
    return mlflow.start_run(run_id=run_id, **kw)
