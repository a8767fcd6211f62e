"""`start: auto`: the first member (or sweep) into an empty store makes the start, once however many
arrive together; a claimant whose process died is taken over, a failed start frees its claim."""

import subprocess
import sys

import mlflow
import pytest

from soups import tracking
from soups.recipe import load_recipe, load_splits
from soups.steps.finetune import finetune, make_start
from soups.steps.soup.step import soup_for_sweep
from tests.conftest import ROOT
from tests.starts_world import runs_by_role, start_recipe


@pytest.fixture
def recipe_path(tmp_path, fmnist_root):
    return start_recipe(tmp_path, fmnist_root)


@pytest.mark.slow
def test_a_sweep_resolves_start_auto_once_for_every_trial(recipe_path, tracking_uri, tmp_path, monkeypatch):
    """A start made while the sweep runs never splits its trials between two starts."""
    from soups.steps.sweep import step as sweep_step

    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    first = make_start(load_recipe(recipe_path))
    later = []

    def trial_then_a_new_start(*args, **kwargs):
        run_id = finetune(*args, **kwargs)
        if not later:
            later.append(make_start(load_recipe(recipe_path)))
        return run_id

    opts = sweep_step.SweepOptions(
        trials=2, pruner="none", soup="none", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    steps = sweep_step.Steps(trial_then_a_new_start, make_start, soup_for_sweep)
    out = sweep_step.sweep(
        str(recipe_path), load_recipe(recipe_path, {"start": "auto"}), {"start": "auto"}, opts, steps
    )
    assert out.complete == 2 and later
    children = runs_by_role("ingredient")
    assert len(children) == 2 and {r.data.tags[tracking.START_RUN] for r in children} == {first}
    assert tracking.get_run(out.parent).data.params["start"] == f"runs:/{first}"


@pytest.mark.slow
def test_start_auto_into_an_empty_store_makes_the_start_then_the_member(
    recipe_path, tracking_uri, tmp_path, monkeypatch
):
    """The first command a user types (`finetune -P i=3` with start: auto) works into an empty
    store: the start is trained first, as `-e start` would (member 0's draw), then the member."""
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    member = tracking.get_run(finetune(load_recipe(recipe_path, {"i": 3, "start": "auto"})))
    (start,) = runs_by_role("start")
    assert start.info.status == "FINISHED" and tracking.SHA256 in start.data.tags
    assert member.data.tags[tracking.START_RUN] == start.info.run_id
    assert member.data.params["start"] == f"runs:/{start.info.run_id}"
    assert start.data.params["i"] == "0" and start.data.params["epochs"] == "1"
    assert start.data.params["seed"] == str(load_recipe(recipe_path, {"i": 0}).seed)
    assert start.data.tags[tracking.START_FOR].startswith("test_efficientnet ")
    # the next member finds it: still one start
    finetune(load_recipe(recipe_path, {"i": 4, "start": "auto"}))
    assert len(runs_by_role("start")) == 1


@pytest.mark.slow
def test_under_mlflow_run_the_member_that_made_the_start_logs_into_the_project_run(
    recipe_path, tracking_uri, tmp_path, monkeypatch
):
    """`mlflow run . -e finetune` into an empty store: the run MLflow made for the process (in the
    experiment it chose, here not the recipe's) is the member's, and the start goes beside it.
    MLflow's end_run of the start used to forget that run: the member went to the recipe's
    experiment and MLflow's run stayed empty."""
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    client = mlflow.MlflowClient()
    chosen = client.create_experiment("chosen by mlflow run")
    project = client.create_run(chosen).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project)
    member = finetune(load_recipe(recipe_path, {"i": 3, "start": "auto"}))
    assert member == project
    assert tracking.role_of(tracking.get_run(project)) == "ingredient"
    assert len(client.search_runs([chosen])) == 2, "the start and the member, nothing else"
    (start,) = client.search_runs([chosen], "tags.`soups.role` = 'start'")
    assert tracking.get_run(member).data.tags[tracking.START_RUN] == start.info.run_id
    assert client.get_experiment_by_name("starts") is None, "nothing went to the recipe's experiment"


@pytest.mark.slow
def test_a_start_whose_process_died_is_taken_over_not_waited_for(
    recipe_path, tracking_uri, tmp_path, monkeypatch
):
    """A claimed start run left RUNNING by a killed process (its heartbeat stale) is marked FAILED
    and the start is made again, instead of members waiting for it forever."""
    from soups.tracking import start_claims

    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(recipe_path, {"start": "auto"})

    split = load_splits(recipe).fingerprint
    experiment = tracking.ensure_experiment("starts")
    dead = start_claims.claim(experiment, recipe.model, split, "start ft 1 ep")
    mlflow.MlflowClient().set_tag(dead, tracking.HEARTBEAT, "0")
    member = tracking.get_run(finetune(recipe))
    assert mlflow.MlflowClient().get_run(dead).info.status == "FAILED"
    made = member.data.tags[tracking.START_RUN]
    assert made != dead and tracking.get_run(made).info.status == "FINISHED"


@pytest.mark.slow
def test_members_racing_into_an_empty_server_share_one_start(recipe_path, tmp_path, monkeypatch):
    """Three fine-tunes started at once against a real `mlflow server` with no start run: one
    trains the start, the others wait for it; all three start from its weights."""
    import os

    from tests.conftest import mlflow_server

    with mlflow_server(tmp_path) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SOUPS_CACHE": str(tmp_path / "cache")}
        env.pop("MLFLOW_RUN_ID", None)
        command = [sys.executable, str(ROOT / "entrypoints" / "finetune.py"), "--recipe", str(recipe_path)]
        procs = [
            subprocess.Popen(
                [*command, "--i", str(i), "--start", "auto"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(3)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        starts, members = runs_by_role("start"), runs_by_role("ingredient")
    assert len(starts) == 1 and starts[0].info.status == "FINISHED", [r.info for r in starts]
    assert len(members) == 3 and {r.info.status for r in members} == {"FINISHED"}
    assert {r.data.tags[tracking.START_RUN] for r in members} == {starts[0].info.run_id}
    assert len({r.data.tags[tracking.START] for r in members}) == 1
    assert sum("waiting for start run" in out for out in outputs) >= 1, outputs


def test_a_start_that_fails_before_training_frees_its_claim_at_once(recipe_path, tracking_uri):
    """The claimed start run ends FAILED when its process fails to train it, so that the members
    waiting for it claim again at once instead of after its heartbeat goes stale."""
    from soups.starts import auto_start

    recipe = load_recipe(recipe_path, {"start": "auto"})
    experiment = tracking.ensure_experiment("starts")

    def broken(run_id):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        auto_start(recipe, load_splits(recipe).fingerprint, experiment, broken)
    (claim,) = runs_by_role("start")
    assert claim.info.status == "FAILED" and "failed before training" in claim.data.tags[tracking.STOPPED]


@pytest.mark.slow
def test_a_sweep_into_an_empty_store_makes_its_start_first(recipe_path, tracking_uri, tmp_path, monkeypatch):
    from soups.steps.sweep import step as sweep_step

    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    opts = sweep_step.SweepOptions(
        trials=2, pruner="none", soup="none", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    steps = sweep_step.Steps(finetune, make_start, soup_for_sweep)
    out = sweep_step.sweep(
        str(recipe_path), load_recipe(recipe_path, {"start": "auto"}), {"start": "auto"}, opts, steps
    )
    (start,) = runs_by_role("start")
    assert out.complete == 2 and start.info.status == "FINISHED"
    children = runs_by_role("ingredient")
    assert {r.data.tags[tracking.START_RUN] for r in children} == {start.info.run_id}


def test_a_start_finished_during_the_settle_is_used_not_trained_again(recipe_path, tracking_uri, monkeypatch):
    """A start that finishes between the search that found none and the claim's settle is taken:
    the claim is withdrawn and nobody trains a second start."""
    from soups.tracking import start_claims

    recipe = load_recipe(recipe_path, {"start": "auto"})
    split = load_splits(recipe).fingerprint
    experiment = tracking.ensure_experiment("starts")
    client = mlflow.MlflowClient()
    other = {}

    def meanwhile(seconds):  # another process's start finishes while this one settles
        run = client.create_run(experiment, tags={tracking.ROLE: "start", tracking.SPLIT: split})
        client.log_param(run.info.run_id, "model", recipe.model)
        client.set_tag(run.info.run_id, tracking.SHA256, "f" * 64)
        client.set_terminated(run.info.run_id, "FINISHED")
        other["id"] = run.info.run_id

    monkeypatch.setattr(start_claims.time, "sleep", meanwhile)
    action = start_claims.next_start_action(experiment, recipe.model, split, "start")
    assert (action.kind, action.run_id) == ("use", other["id"])
    assert [r.info.run_id for r in runs_by_role("start")] == [other["id"]], "the claim was withdrawn"


def test_a_claimant_whose_start_was_taken_over_goes_back_to_waiting(recipe_path, tracking_uri):
    """Another process marked this start FAILED (its heartbeat looked stale): it refuses to finish
    it and takes part in the claim again, instead of failing its member."""
    from soups.starts import auto_start

    recipe = load_recipe(recipe_path, {"start": "auto"})
    experiment = tracking.ensure_experiment("starts")
    made = []

    def make(run_id):
        made.append(run_id)
        if len(made) == 1:
            mlflow.MlflowClient().set_terminated(run_id, "FAILED")  # what a taker-over does
            tracking.check_still_claimed(run_id)

    start = auto_start(recipe, load_splits(recipe).fingerprint, experiment, make)
    assert len(made) == 2 and start == f"runs:/{made[1]}"
    assert mlflow.MlflowClient().get_run(made[0]).info.status == "FAILED"
