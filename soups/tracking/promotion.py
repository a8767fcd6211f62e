"""Who is `@champion`: the version a soup step compares with, read so that only "no such alias"
means none, and promotions that take turns in version order (MLflow has no compare-and-set), each
comparing with the champion of its turn."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.names import CHAMPION, CHAMPION_WHY, MAX_NOTE_LENGTH, PENDING, PROMOTION, PROMOTION_BEAT
from soups.tracking.server import quote, shown

log = logging.getLogger(__name__)
# A pending version bumps its promotion beat every BEAT_S while it waits its turn and scores the
# champion (however long that takes); one whose beat stands still for DECIDE_STALE_S lost its step.
# The stale limit is above MLflow's own retries of one request (260 s measured): a beat held up by a
# struggling server is not taken for a dead step.
BEAT_S = 10.0
DECIDE_STALE_S = 300.0
ABANDONED = "not decided: abandoned"


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
        raise SoupsError(f"could not read {name}@{CHAMPION} on {shown()}: {str(e).splitlines()[0]}") from None


def unscored(name: str) -> Rival | None:
    """The champion as a rival nobody scored on this soup's images (None: there is none)."""
    current = champion(name)
    if current is None:
        return None
    return Rival(
        str(current.version), None, f"version {current.version} was not scored on this soup's images"
    )


def promote(
    name: str, version: int, val_accuracy: float, split: str, judge: Callable[[], Rival | None]
) -> str:
    """Move alias `champion` of `name` to `version` when there is none, or when it beats the
    champion's val accuracy measured on the same images (a tie keeps the champion). MLflow has no
    compare-and-set, so promotions take turns in version order: this one waits until every
    earlier version still pending has been decided (or its beat stood still for DECIDE_STALE_S:
    its step died), then `judge` reads the champion and scores it on this soup's images, and the
    alias moves or stays. Two soups finishing together are thus compared with each other, never
    both with the old champion. A version a waiter took for dead (its beat stalled) never moves
    the alias: it reads its own tag before judging and before moving."""
    client = MlflowClient()
    outcome = ""
    stop = threading.Event()
    beating = threading.Thread(target=beat, args=(client, name, version, stop), daemon=True)
    beating.start()
    try:
        wait_for_turn(client, name, version)
        outcome = abandoned(client, name, version) or decide(
            client, name, version, val_accuracy, split, judge()
        )
        return outcome
    except BaseException as e:
        said = (str(e).strip().splitlines() or [""])[0]
        outcome = said if said.startswith(ABANDONED) else f"not decided: {said}"
        if not isinstance(e, SoupsError):
            outcome = f"not decided: {type(e).__name__}" + (f": {said}" if said else "")
        raise
    finally:
        stop.set()
        try:
            if not outcome.startswith(ABANDONED):  # a waiter's record of the stall stays
                client.set_model_version_tag(name, str(version), PROMOTION, outcome[:MAX_NOTE_LENGTH])
        except Exception as e:  # the server went away: do not hide the error that ended the step
            log.warning("version %d of %s: promotion outcome not tagged: %s", version, name, str(e)[:200])


def abandoned(client: MlflowClient, name: str, version: int) -> str:
    """The waiter's verdict when one took this version for dead (it then decides no more), else ""."""
    said = client.get_model_version(name, str(version)).tags.get(PROMOTION, PENDING)
    return said if said.startswith(ABANDONED) else ""


def beat(client: MlflowClient, name: str, version: int, stop: threading.Event) -> None:
    """Bump the version's PROMOTION_BEAT every BEAT_S while it waits and decides: a waiting
    version tells a slow turn from a dead one by whether this changes, on its own clock. The
    value is new for every call (a version promoted again never repeats an old beat)."""
    token, count = uuid.uuid4().hex[:8], 0
    while True:
        try:
            client.set_model_version_tag(name, str(version), PROMOTION_BEAT, f"{token}-{count}")
        except Exception as e:  # a lost beat only risks being skipped as dead after DECIDE_STALE_S
            log.debug("promotion beat of version %d of %s not written: %s", version, name, e)
        count += 1
        if stop.wait(BEAT_S):
            return


def decide(client, name: str, version: int, val_accuracy: float, split: str, rival: Rival | None) -> str:
    def move(why: str) -> str:
        if gone := abandoned(client, name, version):  # taken for dead while it judged: no move
            raise SoupsError(gone)
        client.set_registered_model_alias(name, CHAMPION, str(version))
        try:
            client.set_model_version_tag(name, str(version), CHAMPION_WHY, why)
        except MlflowException as e:  # the alias moved: the outcome must say so, tag or not
            log.warning(
                "version %d of %s is champion; its %s tag not written: %s", version, name, CHAMPION_WHY, e
            )
        return why

    if rival is None:
        why = move(f"the first {CHAMPION} (val {val_accuracy:.4f} on split {split})")
        return f"{name} version {version} is {why}"
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


def wait_for_turn(client: MlflowClient, name: str, version: int, poll_s: float = 1.0) -> None:
    """Until no earlier version of `name` is pending. A pending version whose beat has not changed
    for DECIDE_STALE_S, timed on this process's own clock (no two machines' clocks compared), lost
    its step: it is tagged abandoned, and no later promotion waits for it again."""
    seen: dict[int, tuple[str, float]] = {}  # version -> (its beat, when that last changed here)
    said = False
    while True:
        now, ahead = time.monotonic(), []
        for v in client.search_model_versions(f"name = {quote(name)}"):
            n = int(v.version)
            if n >= version or v.tags.get(PROMOTION) != PENDING:
                continue
            beat_now = v.tags.get(PROMOTION_BEAT, "")
            if n not in seen or seen[n][0] != beat_now:
                seen[n] = (beat_now, now)
            if now - seen[n][1] > DECIDE_STALE_S:
                if client.get_model_version(name, str(n)).tags.get(PROMOTION) != PENDING:
                    continue  # it decided meanwhile: its outcome stands
                gone = f"{ABANDONED} (its promotion beat stopped for {DECIDE_STALE_S:.0f} s)"
                client.set_model_version_tag(name, str(n), PROMOTION, gone)
                log.info("version %d of %s: %s", n, name, gone)
                continue
            ahead.append(n)
        if not ahead:
            return
        if not said:
            log.info("version %d of %s waits for version(s) %s to be compared first", version, name, ahead)
            said = True
        time.sleep(poll_s)
