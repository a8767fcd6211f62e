"""Reaching the tracking server: which one (URI, store creation), whether it answers, and turning
its failures into one-line errors; plus the few string checks every search and param needs."""

from __future__ import annotations

import fcntl
import functools
import math
import os
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError

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
    if uri.startswith(("http://", "https://")):
        check_access(uri)
    return uri


def shown(uri: str | None = None) -> str:
    """The tracking URI (the current one by default) as messages show it: never its password."""
    return without_password(uri or mlflow.get_tracking_uri())


# How long a step waits for a server that refuses connections before it says so: long enough for
# a server being restarted, far shorter than MLflow's own retries (7 with exponential backoff,
# 260 s measured) that suit a server answering slowly or rate-limiting.
CONNECT_WAIT_S = 15.0
CONNECT_WAIT_ENV = "SOUPS_CONNECT_WAIT_S"  # overrides it (tests; a server that takes longer to restart)


def connect_wait_s() -> float:
    given = os.environ.get(CONNECT_WAIT_ENV) or str(CONNECT_WAIT_S)
    try:
        wait = float(given)
    except ValueError:
        wait = math.nan
    if not (math.isfinite(wait) and wait > 0):  # nan would wait forever, 0 would never connect
        raise SoupsError(f"{CONNECT_WAIT_ENV}={given!r} must be a number of seconds above 0")
    return wait


def refused(uri: str, wait_s: float | None = None) -> str | None:
    """Why nothing accepts TCP connections at the server's host and port after trying for
    `wait_s` seconds (`connect_wait_s()` unless given), or None as soon as something does (slow
    to answer or not: MLflow's retries handle that)."""
    parts = urllib.parse.urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return None  # reached through a proxy: only MLflow's own requests can tell
    wait_s = connect_wait_s() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((parts.hostname, port), timeout=min(5.0, max(wait_s, 0.5))):
                return None
        except OSError as e:
            if time.monotonic() + 1 >= deadline:
                return e.strerror or str(e)
            time.sleep(1)


@functools.cache
def check_access(uri: str) -> None:
    """One request to the server (once per process): a refused login or an unreachable server is
    a one-line error here, not a traceback in the middle of a step."""
    if why := refused(uri):
        raise Unreachable(
            f"tracking server {shown(uri)} unreachable after {connect_wait_s():g} s: is it running? ({why})"
        )
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.get_http_status_code() in (401, 403) or e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            hint = f"user {who!r} was refused" if who else "no credentials given"
            raise SoupsError(
                f"tracking server {shown(uri)} refused access ({hint}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD"
            ) from None
        if is_unreachable(e):
            raise Unreachable(
                f"tracking server {shown(uri)} unreachable: is it running? ({str(e).splitlines()[0][-120:]})"
            ) from None
        raise


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


class Unreachable(SoupsError):
    """The tracking server did not answer, even after MLflow's own bounded retries."""


@contextmanager
def raising_unreachable() -> Iterator[None]:
    """Turn MLflow's "server did not answer" (after its own bounded retries) into `Unreachable`."""
    try:
        yield
    except Exception as e:
        if is_unreachable(e):
            raise Unreachable(f"tracking server {shown()} unreachable") from e
        raise


def is_unreachable(error: BaseException) -> bool:
    text = str(error)
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "Failed to establish a new connection",
        "Read timed out",
        "RemoteDisconnected",
    )
    return isinstance(error, MlflowException | OSError) and any(m in text for m in markers)


def quote(value: str) -> str:
    """A string literal for an MLflow search filter. MLflow's filter syntax has no escape for a
    quote inside a literal, so a value holding one is refused rather than let it end the literal
    and change the query."""
    text = str(value)
    if any(c in text for c in "'\"`\\") or any(ord(c) < 32 for c in text):
        raise SoupsError(
            f"{text!r} cannot be searched for: quotes, backslashes and control characters are refused"
        )
    return f"'{text}'"


RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def checked_run_id(run_id: str, what: str = "run id") -> str:
    """A run id as MLflow makes them (hex), never a path or a filter clause in disguise: ids reach
    search filters and the checkpoint cache's paths."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise SoupsError(f"{what} {run_id!r} is not a run id (letters, digits, - and _ only)")
    return run_id


def without_password(url: str) -> str:
    """A storage URL fit for a param: the password replaced by *** (all of it: a password may hold
    `@`, `:` or `/`, so the credentials end at the URL's last `@`)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def has_password(url: str) -> bool:
    return without_password(url) != url


# What a tracking store answers when two processes insert the same row at the same moment: a
# single `set_experiment_tag` (or `set_tag`) is a read-then-insert in MLflow's SQL store, so the
# slower insert of a pair fails with the database's unique-key error (PostgreSQL, SQLite, MySQL).
CONFLICTS = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, MlflowException) and any(m in str(error) for m in CONFLICTS)
