"""The soups of a sweep: after every K completed (not pruned) trials (`soup=every:K`) and when the
last one finishes (`soup=end`, the default), the sweep's trials are souped into the registered
model, so the champion follows the sweep. Each soup continues the sweep's previous one (the
champion for the first; see `score_book`), so it scores only what the new trials add.

However many workers share the study, one soups at a time and no trial waits for it: a worker
that wants a soup marks the study `soup pending`, then tries to take the soup lock, an Optuna study
of its own whose creation is atomic in the storage. The winner soups in a background process until
nothing is pending, then drops the lock and looks once more (a request that met the lock just
before it was dropped is served either by its own worker or by this one). A worker ends only when
the soups it started have ended."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.study import StudyDirection

from soups import SoupsError, one_line

log = logging.getLogger(__name__)
PENDING_ATTR = "soups_soup_pending"
LAST_ATTR = "soups_last_soup"  # the sweep's latest soup run: the next one continues it
COVERED_ATTR = "soups_soup_covers"  # finished trials the latest soup request covers
BEAT_ATTR, HOLDER_ATTR = "beat", "holder"
LOCK_SUFFIX = ":souping"
BEAT_S, STALE_S = 10.0, 120.0  # a lock whose holder has not beaten for STALE_S is taken over
NONE, END = "none", "end"


def soup_every(value: str) -> int | None:
    """`end` -> 0 (only when the sweep ends), `every:K` -> K, `none` -> None."""
    if value == NONE:
        return None
    if value == END:
        return 0
    kind, _, k = value.partition(":")
    if kind != "every" or not k.isdigit() or int(k) < 1:
        raise SoupsError(f"soup={value!r} must be end, none or every:K with K >= 1 (e.g. every:4)")
    return int(k)


@dataclass(frozen=True)
class SoupJob:
    """What a background soup needs (picklable: it crosses into a fresh process)."""

    storage: str
    study: str
    soup: Callable[[str], tuple[str, str]]  # soup(continue_from) -> (soup run id, what to log)


def due(study: optuna.Study, every: int | None, ended: bool) -> int:
    """Completed trials a soup requested now would cover, or 0 when none is due: every K of them,
    and all of them when the sweep has ended; never the same trials twice."""
    if every is None:
        return 0
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    covers = complete if ended else (complete // every * every if every else 0)
    return covers if covers > study.user_attrs.get(COVERED_ATTR, 0) else 0


def request(study: optuna.Study, storage, job: SoupJob, covers: int, started: list) -> None:
    """Ask for a soup of the `covers` completed trials; start it here unless another soups now."""
    study.set_user_attr(COVERED_ATTR, max(covers, study.user_attrs.get(COVERED_ATTR, 0)))
    study.set_user_attr(PENDING_ATTR, True)
    lock = take_lock(storage, job.study)
    if lock is None:
        log.info(
            "a soup is under way (this or another worker's): it soups again for the %d completed trials",
            covers,
        )
        return
    proc = multiprocessing.get_context("spawn").Process(target=serve, args=(job, lock), name="sweep-soup")
    proc.start()
    started.append(proc)
    log.info("souping the sweep's %d completed trials in the background (process %d)", covers, proc.pid)


def finish(study: optuna.Study, storage, job: SoupJob, started: list, ended: bool) -> None:
    """Wait for the soups this worker started. When the sweep has ended and a soup is still owed
    (its souper died holding the lock), wait for a live souper or take the lock once it goes stale
    and soup: the sweep's last soup is never lost."""
    for proc in started:
        proc.join()
        if proc.exitcode:
            log.warning("the sweep's soup process %d exited %d", proc.pid, proc.exitcode)
    while ended and study.user_attrs.get(PENDING_ATTR, False):
        lock = take_lock(storage, job.study)
        if lock is None:
            time.sleep(BEAT_S / 2)  # a live souper serves it, or its lock goes stale
            continue
        proc = multiprocessing.get_context("spawn").Process(target=serve, args=(job, lock), name="sweep-soup")
        proc.start()
        proc.join()


@dataclass(frozen=True)
class Lock:
    """A held soup lock: its study and the holder's token (SQLite reuses a dropped study's id)."""

    id: int
    token: str


def take_lock(storage, study: str) -> Lock | None:
    """The soup lock when this process took it, else None."""
    name = study + LOCK_SUFFIX
    for _ in range(2):
        try:
            lock = Lock(storage.create_new_study([StudyDirection.MAXIMIZE], name), uuid.uuid4().hex)
            storage.set_study_user_attr(lock.id, HOLDER_ATTR, lock.token)
            storage.set_study_user_attr(lock.id, BEAT_ATTR, time.time())
            return lock
        except optuna.exceptions.DuplicatedStudyError:
            try:
                held = storage.get_study_id_from_name(name)
                attrs = storage.get_study_user_attrs(held)
            except KeyError:  # dropped meanwhile: try again
                continue
            beat = attrs.get(BEAT_ATTR, time.time())
            if time.time() - beat < STALE_S:
                return None
            log.warning("the soup lock of %s is stale (%.0f s): taking it over", study, time.time() - beat)
            drop_lock(storage, Lock(held, attrs.get(HOLDER_ATTR, "")))  # that very lock
    return None


def drop_lock(storage, lock: Lock) -> None:
    """Drop `lock` if it is still the one held (a lock taken over belongs to its new holder)."""
    try:
        if storage.get_study_user_attrs(lock.id).get(HOLDER_ATTR, "") == lock.token:
            storage.delete_study(lock.id)
    except KeyError:  # dropped already
        pass


def serve(job: SoupJob, lock: Lock | None) -> None:
    """The background process: soup while soups are pending, holding the lock; then drop it and
    look once more."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # the worker's own `mlflow run` run is not the soup's
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    storage = None
    try:
        storage = optuna.storages.RDBStorage(job.storage)
        study = storage.get_study_id_from_name(job.study)
        attrs = lambda: storage.get_study_user_attrs(study)  # noqa: E731
        while lock is not None:
            with beating(storage, lock):
                while attrs().get(PENDING_ATTR, False):
                    storage.set_study_user_attr(study, PENDING_ATTR, False)
                    try:
                        run_id, said = job.soup(attrs().get(LAST_ATTR) or "auto")
                        storage.set_study_user_attr(study, LAST_ATTR, run_id)
                        log.info("sweep soup: %s", said)
                    except Exception as e:  # noqa: BLE001  (every trial so far pruned, a server
                        # gone for a while: the sweep goes on, the next request tries again)
                        log.warning("sweep soup not made: %s", one_line(e))
            drop_lock(storage, lock)
            lock = take_lock(storage, job.study) if attrs().get(PENDING_ATTR, False) else None
    finally:
        if storage is not None and lock is not None:
            drop_lock(storage, lock)


class beating:
    """Keeps the lock's heartbeat fresh while the body runs (a failed beat is logged, not fatal:
    a lock that stops beating for STALE_S is taken over)."""

    def __init__(self, storage, lock: Lock):
        self.storage, self.lock, self.stop = storage, lock, threading.Event()

    def __enter__(self):
        def beat() -> None:
            while not self.stop.wait(BEAT_S):
                try:
                    self.storage.set_study_user_attr(self.lock.id, BEAT_ATTR, time.time())
                except Exception as e:  # noqa: BLE001
                    log.warning("soup lock heartbeat failed: %s", one_line(e))

        self.thread = threading.Thread(target=beat, daemon=True, name="soup-lock-beat")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
