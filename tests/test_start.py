"""The shared start: made once as a `start` run, loaded strictly (head included) by every member,
recorded by digest on each ingredient, and never mixed across starts in a soup."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch

from soups import SoupsError, tracking
from soups.models import create_model, head_keys, load_checkpoint, load_start, weights_digest
from soups.recipe import load_recipe, load_splits
from soups.steps.finetune import finetune, make_start
from soups.steps.soup.step import SoupOptions, make_soup, soup_for_sweep
from tests.conftest import ROOT, TINY, write_recipe


@pytest.fixture
def recipe_path(tmp_path, fmnist_root):
    return write_recipe(
        tmp_path / "tiny.yaml",
        experiment="starts",
        data=str(fmnist_root),
        layout="fashion-mnist",
        **{**TINY, "epochs": 1, "start_epochs": 1},
        space={"seed": {"int": [0, 999]}, "lr": {"log_uniform": [1e-3, 3e-3]}},
    )


def runs_by_role(role):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("starts").experiment_id
    return client.search_runs([exp], f"tags.`soups.role` = '{role}'", order_by=["attributes.start_time ASC"])


def checkpoint(run):
    return load_checkpoint(tracking.cached_checkpoint(run)[0])


@pytest.mark.slow
def test_members_start_from_every_weight_of_the_start_run(recipe_path, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    start_id = make_start(load_recipe(recipe_path))
    (start,) = runs_by_role("start")
    assert start.info.run_id == start_id and start.info.status == "FINISHED"
    assert start.data.params["epochs"] == "1" and tracking.SHA256 in start.data.tags
    weights = checkpoint(start).state_dict
    captured = {}
    real = load_start

    def spy(model, state, source):
        real(model, state, source)
        captured["head"] = {k: model.state_dict()[k].clone() for k in head_keys(model)}

    monkeypatch.setattr("soups.starts.load_start", spy)
    member_ids = [finetune(load_recipe(recipe_path, {"i": i, "start": "auto"})) for i in range(2)]
    members = [tracking.get_run(r) for r in member_ids]
    for run in members:
        assert run.data.tags[tracking.START] == weights_digest(weights)
        assert run.data.tags[tracking.START_RUN] == start_id
    assert captured["head"] and all(torch.equal(v, weights[k]) for k, v in captured["head"].items())
    assert any(v.abs().sum() > 0 for v in captured["head"].values()), "the start's trained head, not zeros"
    # runs:/ names the same start
    explicit = tracking.get_run(finetune(load_recipe(recipe_path, {"i": 2, "start": f"runs:/{start_id}"})))
    assert explicit.data.tags[tracking.START] == weights_digest(weights)


@pytest.mark.slow
def test_a_wrong_data_folder_is_one_line_and_leaves_no_run_behind(recipe_path, tracking_uri, tmp_path):
    """A typo in `data` is found before any run exists: no FAILED run named like an ingredient."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe_path), "--start", "auto"]
        + ["--data", str(tmp_path / "no-such-folder")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "no-such-folder" in last
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == [], "no run created for a mistake in a parameter"


def test_a_start_from_another_split_is_refused_by_name(recipe_path, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    other = make_start(load_recipe(recipe_path, {"split_seed": 7}))
    with pytest.raises(SoupsError, match=f"start runs:/{other} was trained on split .* may have seen"):
        finetune(load_recipe(recipe_path, {"start": f"runs:/{other}"}))
    # start=auto never takes a start of another split: it makes one for this split
    member = tracking.get_run(finetune(load_recipe(recipe_path, {"start": "auto"})))
    assert member.data.tags[tracking.START_RUN] not in ("", other)


def test_random_init_members_share_their_start(recipe_path, tracking_uri):
    """pretrained=none: members with different seeds still start from the very same weights."""
    ids = [finetune(load_recipe(recipe_path, {"i": i})) for i in range(2)]
    seeds = {tracking.get_run(r).data.params["seed"] for r in ids}
    starts = {tracking.get_run(r).data.tags[tracking.START] for r in ids}
    assert len(seeds) == 2 and len(starts) == 1
    torch.manual_seed(123)
    assert starts == {weights_digest(create_model("test_efficientnet", 10).state_dict())}


def test_a_linear_probe_start_trains_the_head_alone(recipe_path, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    make_start(load_recipe(recipe_path, {"start_mode": "probe", "lr": 1e-2}))
    (start,) = runs_by_role("start")
    trained = checkpoint(start).state_dict
    initial = create_model("test_efficientnet", 10).state_dict()
    head = head_keys(create_model("test_efficientnet", 10))
    assert all(not torch.equal(trained[k], initial[k]) for k in head)
    body = [k for k in initial if k not in head]
    assert all(torch.equal(trained[k], initial[k]) for k in body), "backbone and its BatchNorm statistics"


def test_load_start_is_strict_and_names_the_first_difference():
    model = create_model("test_efficientnet", 10)
    state = create_model("test_efficientnet", 3).state_dict()
    with pytest.raises(SoupsError, match=r"classifier.weight has shape \(3, .*\), the model \(10, "):
        load_start(model, state, "runs:/abc")
    partial = dict(model.state_dict())
    partial.pop("classifier.bias")
    with pytest.raises(SoupsError, match="key classifier.bias missing"):
        load_start(model, partial, "x.pt")


@pytest.mark.slow
def test_greedy_soup_never_mixes_starts(recipe_path, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    make_start(load_recipe(recipe_path))
    shared = [finetune(load_recipe(recipe_path, {"i": i, "start": "auto"})) for i in range(2)]
    loner = finetune(load_recipe(recipe_path, {"i": 2, "lr": 1e-7}))  # from the pretrained weights
    report = make_soup(
        load_recipe(recipe_path),
        {},
        SoupOptions(method="uniform", compare="model_stock", bn_recalibrate="off"),
    )
    table = report.table.set_index("run_id")
    assert table.loc[loner, "status"] == "skipped"
    assert "incompatible: started from weights" in table.loc[loner, "reason"]
    assert (
        f"start run {tracking.get_run(shared[0]).data.tags[tracking.START_RUN]}" in table.loc[loner, "reason"]
    )
    assert sorted(report.chosen.result.ingredients) == sorted(shared)
    stock = next(d for d in report.dishes if d.method == "model_stock")
    assert stock.result is not None and sorted(stock.result.ingredients) == sorted(shared)
    soup_run = runs_by_role("soup")[-1]
    logged = pd.read_csv(
        mlflow.MlflowClient().download_artifacts(soup_run.info.run_id, "ingredients.csv", str(tmp_path))
    )
    assert "incompatible: started from" in logged.set_index("run_id").loc[loner, "reason"]


@pytest.mark.slow
def test_a_missing_start_checkpoint_fails_the_soup_by_name_and_registers_nothing(
    recipe_path, tracking_uri, tmp_path, monkeypatch
):
    from pathlib import Path
    from urllib.parse import urlparse

    monkeypatch.setenv("SOUPS_CACHE", str(tmp_path / "cache"))
    start_id = make_start(load_recipe(recipe_path))
    for i in range(2):
        finetune(load_recipe(recipe_path, {"i": i, "start": "auto"}))
    artifacts = Path(urlparse(tracking.get_run(start_id).info.artifact_uri).path)
    (artifacts / "checkpoint" / "model.pt").unlink()
    for cached in (tmp_path / "cache").rglob("model.pt"):
        if start_id in str(cached):
            cached.unlink()
    with pytest.raises(
        SoupsError, match=f"start run {start_id} of the ingredients: checkpoint of run {start_id}"
    ):
        make_soup(load_recipe(recipe_path), {}, SoupOptions(method="model_stock", bn_recalibrate="off"))
    client = mlflow.MlflowClient()
    assert client.search_model_versions() == [], "nothing registered from a failed soup"
    assert runs_by_role("soup")[-1].info.status == "FAILED"
    # a compared method that cannot cook is reported, the chosen one still ships
    report = make_soup(load_recipe(recipe_path), {}, SoupOptions(compare="model_stock", bn_recalibrate="off"))
    stock = next(d for d in report.dishes if d.method == "model_stock")
    assert stock.result is None and f"start run {start_id}" in stock.error


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


def test_best_val_accuracy_is_the_best_epoch_not_the_last(recipe_path, tracking_uri, monkeypatch):
    """An ingredient whose val accuracy drops after epoch 1: the summary keeps epoch 1's."""
    import soups.steps.finetune

    def fit(model, loader, val, cfg, mean, std, device, report, *rest, **keywords):
        for epoch, acc in ((1, 0.8), (2, 0.6)):
            report(epoch, {"val_accuracy": acc, "val_loss": 1.0, "train_loss": 1.0})

    monkeypatch.setattr(soups.steps.finetune, "fit", fit)
    run = mlflow.MlflowClient().get_run(finetune(load_recipe(recipe_path, {"epochs": 2})))
    m = run.data.metrics
    assert (m["val_accuracy"], m["best_val_accuracy"], m["best_val_epoch"]) == (0.6, 0.8, 1)


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
