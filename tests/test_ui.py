"""What the MLflow UI shows: run names, dataset inputs, descriptions, registry lineage and summary
metrics of a small pipeline on a real `mlflow server`, then its pages rendered in a real headless
Chromium."""

import os
import shutil
import subprocess
import tempfile

import mlflow
import pytest

from soups import data, tracking
from soups.recipe import load_recipe, load_splits
from soups.steps.evaluate import evaluate_runs
from soups.steps.finetune import finetune, make_start
from soups.steps.infer import InferOptions, infer
from soups.steps.soup.step import SoupOptions, make_soup
from tests.conftest import TINY, mlflow_server, service_missing, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

NOTE = "mlflow.note.content"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, fmnist_root):
    """start, two members, a run the user named, evaluate, a soup (uniform beside greedy), infer."""
    work = tmp_path_factory.mktemp("ui")
    data_dir = shutil.copytree(fmnist_root, work / "Clothes Photos")  # a folder name to derive from
    recipe = write_recipe(
        work / "tiny.yaml",
        experiment="ui",
        data=str(data_dir),
        layout="fashion-mnist",
        description="Tiny Fashion-MNIST sweep for the UI test.",
        **{**TINY, "epochs": 1, "start_epochs": 1, "test_ratio": 0.0},
        space={"lr": {"log_uniform": [1e-3, 3e-3]}, "seed": {"int": [0, 999]}},
    )
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "SOUPS_CACHE", "MLFLOW_RUN_ID")}
    with mlflow_server(work) as uri:
        os.environ.update(MLFLOW_TRACKING_URI=uri, SOUPS_CACHE=str(work / "cache"))
        os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            client = mlflow.MlflowClient(uri)
            start = make_start(load_recipe(recipe))
            members = [finetune(load_recipe(recipe, {"i": i, "start": "auto"})) for i in range(2)]
            exp = client.get_experiment_by_name("ui").experiment_id
            named = client.create_run(exp, run_name="my own name").info.run_id  # as `mlflow run --run-name`
            os.environ["MLFLOW_RUN_ID"] = named
            finetune(load_recipe(recipe, {"i": 2, "start": "auto"}))
            os.environ.pop("MLFLOW_RUN_ID", None)  # mlflow consumes it when it resumes the run
            evaluation = evaluate_runs(load_recipe(recipe), {}).run_id
            soup = make_soup(load_recipe(recipe), {}, SoupOptions(compare="uniform", bn_recalibrate="off"))
            inference = infer(load_recipe(recipe), InferOptions()).run_id
            yield dict(
                uri=uri,
                client=client,
                exp=exp,
                start=start,
                members=members,
                named=named,
                evaluation=evaluation,
                soup=soup,
                inference=inference,
                data=data_dir,
                work=work,
            )
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run(p, run_id):
    return p["client"].get_run(run_id)


def test_every_run_has_a_readable_name_and_a_given_name_wins(pipeline):
    p = pipeline
    assert run(p, p["start"]).info.run_name == "start ft 1 ep"
    names = [run(p, m).info.run_name for m in p["members"]]
    assert names[0].startswith("finetune i=0 lr=") and names[1].startswith("finetune i=1 lr=")
    assert run(p, p["named"]).info.run_name == "my own name"
    assert run(p, p["evaluation"]).info.run_name == "evaluate test (3 runs)"
    soup_name = run(p, p["soup"].run_id).info.run_name
    kept = p["soup"].chosen.n_ingredients
    assert soup_name.startswith(f"greedy soup {kept}/3 (") and soup_name.endswith(" val)")
    assert run(p, p["inference"]).info.run_name == "infer @champion"


def test_runs_log_the_data_they_used_as_mlflow_datasets(pipeline):
    p = pipeline
    splits = load_splits(load_recipe(p["work"] / "tiny.yaml"))

    def inputs(run_id):
        return {
            next(t.value for t in d.tags if t.key == "mlflow.data.context"): (
                d.dataset.name,
                d.dataset.digest,
            )
            for d in run(p, run_id).inputs.dataset_inputs
        }

    member = inputs(p["members"][0])
    assert member == {
        "training": ("clothes-photos/train", data.digest(splits.train)),
        "validation": ("clothes-photos/val", data.digest(splits.val)),
    }
    assert inputs(p["soup"].run_id)["validation"] == member["validation"]
    assert inputs(p["evaluation"])["test"] == ("clothes-photos/test", data.digest(splits.test))
    other = load_splits(load_recipe(p["work"] / "tiny.yaml", {"split_seed": 1}))
    assert data.digest(other.val) != data.digest(splits.val), "the digest follows the split"


def test_descriptions_say_what_each_run_is_and_link_its_lineage(pipeline):
    p = pipeline
    member = run(p, p["members"][0]).data.tags[NOTE]
    assert "Sweep member 0" in member and f"runs/{p['start']}" in member and "lr " in member
    soup = run(p, p["soup"].run_id).data.tags[NOTE]
    for ingredient in [*p["members"], p["named"]]:
        assert f"(#/experiments/{p['exp']}/runs/{ingredient})" in soup
    assert "greedy soup" in soup and f"runs/{p['start']}" in soup and "| uniform |" in soup
    evaluation = run(p, p["evaluation"]).data.tags[NOTE]
    assert "Held-out scores on test" in evaluation and p["members"][1] in evaluation
    assert "clothes-photos-soup@champion" in run(p, p["inference"]).data.tags[NOTE]
    experiment = p["client"].get_experiment(p["exp"]).tags
    assert experiment[NOTE] == "Tiny Fashion-MNIST sweep for the UI test."
    assert experiment["mlflow.experimentKind"] == "custom_model_development"


def test_the_registered_soup_follows_the_data_and_carries_its_lineage(pipeline):
    p = pipeline
    client = p["client"]
    version = client.get_model_version_by_alias("clothes-photos-soup", "champion")
    assert version.run_id == p["soup"].run_id
    tags = version.tags
    assert tags["soups.soup_run"] == p["soup"].run_id and tags["soups.method"] == "greedy"
    assert set(tags["soups.ingredients"].split(",")) == set(p["soup"].chosen.result.ingredients)
    assert (
        tags["soups.start_run"] == p["start"]
        and tags["soups.start"] == run(p, p["members"][0]).data.tags[tracking.START]
    )
    assert float(tags["val_accuracy"]) == pytest.approx(p["soup"].chosen.val_accuracy, abs=1e-4)
    assert tags["soups.champion_because"].startswith("the first champion")
    assert p["soup"].run_id in version.description and "Ingredients:" in version.description
    assert "clothes-photos-soup version 1" in p["soup"].registry


def test_runs_carry_the_summary_metrics_people_sort_by(pipeline):
    p = pipeline
    member = run(p, p["members"][0]).data.metrics
    assert member["best_val_accuracy"] >= member["val_accuracy"] and member["best_val_epoch"] == 1
    soup = run(p, p["soup"].run_id).data.metrics
    assert soup["val_gain_over_best_ingredient"] == pytest.approx(
        soup["val_accuracy"] - soup["best_ingredient_val_accuracy"]
    )


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: str | None = None) -> str:
    """The page as a real headless Chromium renders it (its DOM after the scripts ran)."""
    profile = tempfile.mkdtemp(prefix="soups-chromium-")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--window-size=1600,1000",
    ]
    try:
        if screenshot:
            subprocess.run(
                [chromium(), *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180
            )
        out = subprocess.run(
            [chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
        )
        return out.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_ui_shows_names_datasets_and_the_soups_ingredients_in_a_real_browser(pipeline):
    if chromium() is None:
        service_missing("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    p = pipeline
    runs_page = render(f"{p['uri']}/#/experiments/{p['exp']}/runs")
    for name in (
        "start ft 1 ep",
        "finetune i=0 lr=",
        "my own name",
        "evaluate test (3 runs)",
        "infer @champion",
    ):
        assert name in runs_page, name
    assert "clothes-photos/train" in runs_page, "the Dataset column"
    soup_page = render(f"{p['uri']}/#/experiments/{p['exp']}/runs/{p['soup'].run_id}")
    assert "greedy soup" in soup_page
    for ingredient in p["soup"].chosen.result.ingredients:
        assert ingredient[:8] in soup_page, "the description lists the ingredients"


def test_system_metrics_are_logged_when_asked(tmp_path, monkeypatch):
    """-P system_metrics=true: MLflow's own sampler logs CPU and memory into the step's run."""
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", experiment="sys", system_metrics=True))
    plain = load_recipe(write_recipe(tmp_path / "p.yaml", experiment="sys"))
    with tracking.start_step("evaluation", recipe, "with system metrics") as on:
        time.sleep(2)
    with tracking.start_step("evaluation", plain, "without") as off:
        time.sleep(1)
    client = mlflow.MlflowClient()
    logged = client.get_run(on.id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in logged), sorted(logged)
    assert any(k.startswith("system/system_memory_usage") for k in logged), sorted(logged)
    assert not any(k.startswith("system/") for k in client.get_run(off.id).data.metrics)
