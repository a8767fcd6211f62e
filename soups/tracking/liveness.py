"""Whether a run's process is alive: the heartbeat a training run tags every few seconds, and how
a reader tells a live run from one whose process is gone."""

from __future__ import annotations

import os
import time

from soups.tracking.names import HEARTBEAT, HEARTBEAT_EVERY

HEARTBEAT_S = 30.0  # how often a training run says its process is alive (start_claims.STALE_S)
HEARTBEAT_ENV = "SOUPS_HEARTBEAT_S"  # overrides it (tests; a team whose runs must resume sooner)
LIVE_BEATS = 3  # a RUNNING run that beat within this many of its intervals may still be alive


def heartbeat_interval() -> float:
    return float(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_S)


def signs_of_life(run) -> tuple[float, float] | None:
    """(seconds since its last beat, seconds until it counts as dead) of a run whose process may
    still be alive (RUNNING, or ended and being resumed), or None when its beats stopped long
    enough ago (LIVE_BEATS of its own interval)."""
    beat = run.data.tags.get(HEARTBEAT)
    ended = (run.info.end_time or 0) / 1000
    # A beat after the run ended is a resuming process's, before it reopens the run (the beat and
    # the end time come from two machines' clocks: assumed in sync, as below).
    if beat is None or (run.info.status != "RUNNING" and float(beat) <= ended):
        return None
    every = float(run.data.tags.get(HEARTBEAT_EVERY, HEARTBEAT_S))
    age = max(0.0, time.time() - float(beat))  # wall clocks of two machines: assumed in sync (NTP)
    return (age, LIVE_BEATS * every - age) if age < LIVE_BEATS * every else None
