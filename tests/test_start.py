"""The shared start: made once as a `start` run, loaded strictly (head included) by every member,
recorded by digest on each ingredient, and never mixed across starts in a soup."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch

from soups import SoupsError, tracking
from soups.models import create_model, head_keys, load_start, weights_digest
from soups.recipe import load_recipe
from soups.steps.finetune import finetune, make_start
from soups.steps.soup.step import SoupOptions, make_soup
from tests.conftest import ROOT
from tests.starts_world import checkpoint, runs_by_role, start_recipe


@pytest.fixture
def recipe_path(tmp_path, fmnist_root):
    return start_recipe(tmp_path, fmnist_root)


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
