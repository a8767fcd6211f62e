"""sweep: Optuna trials as nested ingredient runs, shared by several worker processes through a
real `mlflow server` and a real PostgreSQL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from soups.recipe import draw, load_recipe, registered_name
from soups.steps.sweep.study import DrawSampler, distributions, suggest
from tests.conftest import ROOT, TINY, all_at_once, mlflow_server, postgres_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

BIN = Path(sys.executable).parent
SPACE = {
    "lr": {"log_uniform": [1e-3, 1e-2]},
    "seed": {"int": [0, 1000]},
    "aug": {"choice": ["none", "light"]},
}


def test_random_sampler_draws_what_finetune_draws_for_the_same_index():
    study = optuna.create_study(direction="maximize", sampler=DrawSampler(SPACE))
    for _ in range(4):
        trial = study.ask()
        assert suggest(trial, distributions(SPACE)) == draw(SPACE, trial.number)
        study.tell(trial, 0.0)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mask_root):
    """3 workers, 6 trials, one server, one PostgreSQL study, a soup after every 2 finished trials."""
    work = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(
        work / "tiny.yaml",
        experiment="sweepexp",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 2},
        space=SPACE,
    )
    with postgres_server() as storage, mlflow_server(work) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SOUPS_CACHE": str(work / "cache")}
        env.pop("MLFLOW_RUN_ID", None)
        worker = [
            sys.executable,
            "entrypoints/sweep.py",
            "--recipe",
            str(recipe),
            "--trials",
            "6",
            "--storage",
            storage,
            "--study",
            "shared",
            "--pruner",
            "none",
            "--soup",
            "every:2",
        ]
        outs = all_at_once([worker] * 3, env, cwd=ROOT)
        yield dict(uri=uri, storage=storage, outs=outs, work=work, recipe=recipe, env=env)


def test_three_workers_run_exactly_the_requested_trials_under_one_parent(swept):
    study = optuna.load_study(study_name="shared", storage=swept["storage"])
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(6))
    ran = [int(out.split("this worker ran ")[1].split()[0]) for out, _ in swept["outs"]]
    assert sum(ran) == 6
    client = mlflow.MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name("sweepexp")
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in everything if r.data.tags.get("soups.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.experiment_id == exp.experiment_id
    parent = parents[0]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    soups = [r for r in everything if r.data.tags.get("soups.role") == "soup"]
    assert len(children) == 6 and len(everything) == 7 + len(soups), "nothing filed elsewhere, no stray runs"
    assert all(r.info.experiment_id == exp.experiment_id and r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == list(range(6))
    by_trial = {t.number: t for t in trials}
    for r in children:
        k = int(r.data.tags["optuna_trial"])
        assert r.data.tags["soups.role"] == "ingredient" and r.data.params["i"] == str(k)
        assert r.data.tags["soups.study"] == "shared" and "soups.sha256" in r.data.tags
        assert by_trial[k].user_attrs["mlflow_run_id"] == r.info.run_id
        assert by_trial[k].value == r.data.metrics["val_accuracy"]
        for metric in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, metric)] == [1, 2], metric
        # trial k of a random sweep is finetune -P i=k
        expected = load_recipe(swept["recipe"], {"i": k})
        assert (
            float(r.data.params["lr"]) == pytest.approx(expected.lr) and r.data.params["aug"] == expected.aug
        )
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == "6"
    assert "best_val_accuracy" in parent.data.metrics and "best_trial_run_id" in parent.data.tags
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.html" in plots


def test_the_champion_follows_the_sweep_one_soup_at_a_time(swept):
    client = mlflow.MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name("sweepexp").experiment_id
    children = {r.info.run_id for r in client.search_runs([exp], "tags.`soups.role` = 'ingredient'")}
    soups = client.search_runs([exp], "tags.`soups.role` = 'soup'", order_by=["attributes.start_time ASC"])
    assert 1 <= len(soups) <= 3 and all(s.info.status == "FINISHED" for s in soups)
    for earlier, later in zip(soups, soups[1:], strict=False):
        assert earlier.info.end_time <= later.info.start_time, "two soups of the sweep at once"
        assert later.data.tags["soups.continued_from"], "a later soup continues the champion"
    # the last soup covers every trial: the champion follows the sweep to its end
    book = json.loads(
        Path(
            client.download_artifacts(soups[-1].info.run_id, "soup_book.json", str(swept["work"]))
        ).read_text()
    )
    assert set(book["considered"]) == children
    name = registered_name(load_recipe(swept["recipe"]))
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id in {s.info.run_id for s in soups}
    for tag in ("soups.ingredients", "soups.considered"):
        assert set(champion.tags[tag].split(",")) <= children, tag
    assert set(champion.tags["soups.new_runs"].split(",")) <= set(
        champion.tags["soups.considered"].split(",")
    )
    logs = "".join(err for _, err in swept["outs"])
    assert "souping the sweep's" in logs and "sweep soup: soup run" in logs


def test_rerunning_the_study_continues_it_and_repeats_nothing(swept):
    worker = [
        sys.executable,
        "entrypoints/sweep.py",
        "--recipe",
        str(swept["recipe"]),
        "--trials",
        "6",
        "--storage",
        swept["storage"],
        "--study",
        "shared",
    ]
    out = subprocess.run(worker, cwd=ROOT, env=swept["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "this worker ran 0 trial(s); the study has 6" in out.stdout


def test_greedy_soup_over_the_sweeps_children(swept):
    parent = next(
        r
        for r in mlflow.MlflowClient(swept["uri"]).search_runs(
            [mlflow.MlflowClient(swept["uri"]).get_experiment_by_name("sweepexp").experiment_id],
            "tags.`soups.role` = 'sweep'",
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "entrypoints/greedy_soup.py",
            "--recipe",
            str(swept["recipe"]),
            "--parent",
            parent.info.run_id,
            "--registered_model",
            "swept",
        ],
        cwd=ROOT,
        env=swept["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "of 6 usable ingredients" in out.stdout


def test_a_pruned_trial_ends_killed_without_checkpoint_and_never_feeds_a_soup(
    tmp_path, tracking_uri, mask_root
):
    from soups import tracking
    from soups.steps.finetune import finetune
    from soups.steps.sweep.step import run_trial
    from soups.steps.sweep.study import claim

    recipe = write_recipe(
        tmp_path / "tiny.yaml",
        experiment="pruned",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 3},
        space=SPACE,
    )
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(
        storage=storage,
        direction="maximize",
        sampler=DrawSampler(SPACE),
        pruner=optuna.pruners.ThresholdPruner(lower=1.1),
    )  # always prunes
    study.enqueue_trial({})
    parent = tracking.sweep_parent(None, tracking.ensure_experiment("pruned"), "p")
    run_trial(study, claim(study, storage), str(recipe), {}, distributions(SPACE), parent, "pruned", finetune)
    assert claim(study, storage) is None
    assert study.get_trials()[0].state == optuna.trial.TrialState.PRUNED
    client = mlflow.MlflowClient(tracking_uri)
    child = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.id}'")[0]
    assert (
        child.info.status == "KILLED" and child.data.tags["soups.stopped"] == "pruned by Optuna after epoch 1"
    )
    assert client.list_artifacts(child.info.run_id, "checkpoint") == []
    assert tracking.ranked_ingredients(parent.experiment_id) == []
