"""A sweep's soups: when one is due, and the lock that lets one worker soup at a time."""

import time

import optuna
import pytest

from soups import SoupsError
from soups.steps.sweep import souping as sweep_soups
from soups.steps.sweep.souping import BEAT_ATTR, LOCK_SUFFIX, STALE_S, due, soup_every, take_lock


def test_soup_option_reads_end_none_and_every_k():
    assert soup_every("end") == 0 and soup_every("none") is None and soup_every("every:3") == 3
    for bad in ("every:0", "every:x", "always", "every"):
        with pytest.raises(SoupsError, match="soup="):
            soup_every(bad)


def test_a_soup_is_due_every_k_finished_trials_and_at_the_end_never_for_the_same_trials(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    for value in (0.1, 0.2, 0.3):
        study.add_trial(optuna.trial.create_trial(value=value))
    assert due(study, 2, ended=False) == 2 and due(study, None, ended=True) == 0
    study.set_user_attr(sweep_soups.COVERED_ATTR, 2)
    assert due(study, 2, ended=False) == 0, "the first 2 trials were souped already"
    assert due(study, 2, ended=True) == 3 and due(study, 0, ended=True) == 3
    assert due(study, 0, ended=False) == 0, "soup=end: nothing before the end"


def test_one_worker_takes_the_soup_lock_and_a_stale_one_is_taken_over(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    first = take_lock(storage, "s")
    assert first is not None and take_lock(storage, "s") is None, "the lock is held"
    sweep_soups.drop_lock(storage, first)
    second = take_lock(storage, "s")
    assert second is not None, "dropped, it can be taken again"
    storage.set_study_user_attr(second.id, BEAT_ATTR, time.time() - STALE_S - 1)
    third = take_lock(storage, "s")
    assert third is not None and third.token != second.token, "a holder that stopped beating lost it"
    sweep_soups.drop_lock(storage, second)  # the old holder dropping its lock late drops nothing
    assert take_lock(storage, "s") is None, "the new holder still holds it"


def soup_that_fails_first(calls):
    def soup(continue_from):
        calls.append(continue_from)
        if len(calls) == 1:
            raise RuntimeError("server gone for a while")
        return f"run{len(calls)}", "made"

    return soup


def test_the_souper_serves_every_request_continues_its_last_soup_and_drops_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    storage = optuna.storages.RDBStorage(url)
    calls = []
    job = sweep_soups.SoupJob(url, "s", soup_that_fails_first(calls))
    study.set_user_attr(sweep_soups.PENDING_ATTR, True)
    sweep_soups.serve(job, take_lock(storage, "s"))  # in this process: the soup fails, nothing more
    assert calls == ["auto"] and not study.user_attrs[sweep_soups.PENDING_ATTR]
    assert take_lock(storage, "s") is not None, "a failed soup still drops the lock"
    storage.delete_study(storage.get_study_id_from_name("s" + LOCK_SUFFIX))
    study.set_user_attr(sweep_soups.PENDING_ATTR, True)
    sweep_soups.serve(job, take_lock(storage, "s"))
    study.set_user_attr(sweep_soups.PENDING_ATTR, True)
    sweep_soups.serve(job, take_lock(storage, "s"))
    assert calls == ["auto", "auto", "run2"], "each soup continues the sweep's previous one"
    assert study.user_attrs[sweep_soups.LAST_ATTR] == "run3"
