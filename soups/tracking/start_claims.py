"""`start: auto` as find or make, when several processes may arrive at once. MLflow has no
compare-and-set, so a start run is claimed by creating it: every process that finds no start
creates a RUNNING start run tagged with what it is for, waits a moment, and the oldest live claim
(start time, then run id) wins; the others withdraw theirs (deleted) and wait for the winner. A
claim is live while its process keeps its heartbeat fresh, so a start whose process died is
taken over instead of waited for forever."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.lifecycle import abandon
from soups.tracking.names import HEARTBEAT, ROLE, SHA256, SPLIT, START_FOR
from soups.tracking.server import quote

SETTLE_S = 2.0  # how long a new claim waits for claims made at the same moment to become visible
STALE_S = 180.0  # a RUNNING start whose heartbeat is older than this lost its process


@dataclass(frozen=True)
class StartAction:
    """What a member does about `start: auto`: `use` a finished start run, `make` the start in the
    run it claimed, or `wait` for another process's claim."""

    kind: str  # use | make | wait
    run_id: str


def start_key(model: str, split: str) -> str:
    return f"{model} {split}"


def _search(experiment_id: str, clauses: list[str], order: str = "ASC") -> list:
    try:
        return MlflowClient().search_runs(
            [experiment_id],
            " and ".join(clauses),
            order_by=[f"attributes.start_time {order}", f"attributes.run_id {order}"],
            max_results=100,
        )
    except MlflowException as e:
        raise SoupsError(f"search for start runs failed: {str(e).splitlines()[0]}") from None


def finished_start(experiment_id: str, model: str, split: str):
    """The newest finished start run of an experiment for this model and held-out split, or None."""
    runs = _search(
        experiment_id,
        [
            f"tags.`{ROLE}` = 'start'",
            "attributes.status = 'FINISHED'",
            f"params.model = {quote(model)}",
            f"tags.`{SPLIT}` = {quote(split)}",
            f"tags.`{SHA256}` != ''",
        ],
        "DESC",
    )
    return runs[0] if runs else None


def live_claims(experiment_id: str, model: str, split: str, now: float | None = None) -> list:
    """RUNNING start runs claimed for this model and split whose process is alive, oldest first;
    those whose heartbeat went stale are marked FAILED on the way."""
    now = time.time() if now is None else now
    runs = _search(
        experiment_id,
        [f"tags.`{START_FOR}` = {quote(start_key(model, split))}", "attributes.status = 'RUNNING'"],
    )
    live = []
    for run in runs:
        beat = float(run.data.tags.get(HEARTBEAT, run.info.start_time / 1000))
        if now - beat > STALE_S:
            abandon(run.info.run_id, f"no heartbeat for {now - beat:.0f} s: its process is gone")
        else:
            live.append(run)
    return live


def claim(experiment_id: str, model: str, split: str, name: str) -> str:
    """A new RUNNING start run claimed for this model and split (not active in this process)."""
    tags = {ROLE: "start", SPLIT: split, START_FOR: start_key(model, split), HEARTBEAT: str(time.time())}
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=name).info.run_id


def withdraw(run_id: str) -> None:
    """A claim that lost: deleted, so that the UI and every search see one start."""
    client = MlflowClient()
    client.set_terminated(run_id, "KILLED")
    client.delete_run(run_id)


def next_start_action(experiment_id: str, model: str, split: str, name: str) -> StartAction:
    """Use the newest finished start, wait for a live claim, or claim the start and settle who won."""
    if found := finished_start(experiment_id, model, split):
        return StartAction("use", found.info.run_id)
    if live := live_claims(experiment_id, model, split):
        return StartAction("wait", live[0].info.run_id)
    mine = claim(experiment_id, model, split, name)
    time.sleep(SETTLE_S)
    # Asked again after the settle: a start that finished between the two searches above (this
    # process saw it neither running nor finished) is used, never trained a second time.
    if found := finished_start(experiment_id, model, split):
        withdraw(mine)
        return StartAction("use", found.info.run_id)
    winner = live_claims(experiment_id, model, split)[0].info.run_id
    if winner == mine:
        return StartAction("make", mine)
    withdraw(mine)
    return StartAction("wait", winner)


class TakenOver(SoupsError):
    """A start run another process marked FAILED while this one trained it (its heartbeat looked
    stale): that process trains the start now."""


def check_still_claimed(run_id: str) -> None:
    """Before a start run finishes: refuse when another process took it over (it found the
    heartbeat stale and marked the run FAILED; MLflow would let FAILED turn FINISHED again), so
    that no split ever gets two finished starts."""
    status = MlflowClient().get_run(run_id).info.status
    if status != "RUNNING":
        raise TakenOver(
            f"start run {run_id} was marked {status} by another process while it trained (its "
            f"heartbeat went stale for {STALE_S:.0f} s): that process trains the start; fine-tune again"
        )
