"""evaluate and greedy_soup against a real `mlflow server` on 127.0.0.1: several fine-tunes, one
FAILED, one whose checkpoint was deleted, one from another split."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from soups.models import load_checkpoint
from tests.conftest import ROOT, TINY, mlflow_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

BIN = Path(sys.executable).parent


def sh(args, uri, cache, check=True):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "SOUPS_CACHE": str(cache),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, mask_root):
    """A server with: three good ingredients, one FAILED, one with its checkpoint deleted, one
    trained on another split (barely trained, so that it never ranks first: the top run's split
    is the one a soup keeps)."""
    work = tmp_path_factory.mktemp("server")
    recipe = write_recipe(
        work / "tiny.yaml",
        experiment="soupexp",
        data=str(mask_root),
        layout="mask",
        registered_model="tiny-soup",
        **{**TINY, "epochs": 2, "lr": 2e-3},
        space={"seed": {"int": [0, 1000]}},
    )
    with mlflow_server(work) as uri:
        client = mlflow.MlflowClient(uri)
        client.create_experiment("soupexp")  # once, before the parallel writers
        finetune = [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("MLFLOW_RUN_ID", None)
        jobs = [finetune + ["--i", str(i)] for i in range(4)]
        jobs += [
            finetune + ["--i", "4", "--split_seed", "1", "--lr", "1e-7"],
            finetune + ["--i", "5", "--model", "no_such_model"],
        ]

        def start(job):
            return subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        # The other-split run starts after the rest: at a tie on val accuracy (tiny data, near
        # chance) the server ranks the earlier start first, and the top run's split is the
        # soup's. Started together, it sometimes ranked first and every other run was skipped.
        procs = {k: start(j) for k, j in enumerate(jobs) if k != 4}
        codes = {k: p.wait(timeout=600) for k, p in procs.items()}
        procs[4] = start(jobs[4])
        codes[4] = procs[4].wait(timeout=600)
        procs = [procs[k] for k in range(len(jobs))]
        codes = [codes[k] for k in range(len(jobs))]
        assert codes == [0, 0, 0, 0, 0, 1], [p.stderr.read()[-500:] for p in procs]
        runs = {
            r.data.params["i"]: r
            for r in client.search_runs([client.get_experiment_by_name("soupexp").experiment_id])
        }
        deleted = runs["3"].info.run_id
        for f in (work / "artifacts").rglob("model.pt"):
            if deleted in str(f):
                f.unlink()
        yield dict(uri=uri, recipe=recipe, runs=runs, deleted=deleted, work=work, client=client)


def soup(world, *params, check=True, mlflow_run=False):
    """greedy_soup with `-P key=value` params: as `mlflow run . -e greedy_soup` (`mlflow_run`, as
    the README says; once is enough to test that path), else its entry point alone."""
    recipe = ["-P", f"recipe={world['recipe']}", *params]
    if mlflow_run:
        head = [str(BIN / "mlflow"), "run", ".", "-e", "greedy_soup", "--env-manager", "local"]
        args = [*head, "--experiment-name", "soupexp", *recipe]
    else:  # -P key=value is --key value
        pairs = [p.split("=", 1) for p in recipe[1::2]]
        args = [sys.executable, "entrypoints/greedy_soup.py", *(x for k, v in pairs for x in (f"--{k}", v))]
    return sh(args, world["uri"], world["work"] / "cache", check)


def last_soup(client):
    exp = client.get_experiment_by_name("soupexp").experiment_id
    return client.search_runs([exp], "tags.`soups.role` = 'soup'", order_by=["attributes.start_time DESC"])[0]


def test_greedy_soup_skips_exactly_the_broken_runs_and_registers_a_champion(world):
    out = soup(world, mlflow_run=True)
    client, runs = world["client"], world["runs"]
    assert runs["5"].info.status == "FAILED"
    r = last_soup(client)
    assert r.info.status == "FINISHED"
    table = pd.read_csv(client.download_artifacts(r.info.run_id, "ingredients.csv", str(world["work"])))
    by_i = dict(zip(table.i.astype(str), table.status, strict=True))
    reasons = dict(zip(table.i.astype(str), table.reason, strict=True))
    assert "5" not in by_i, "a FAILED run is never a candidate"
    assert by_i["3"] == "skipped" and "cannot be downloaded" in reasons["3"]
    assert by_i["4"] == "skipped" and "split" in reasons["4"]
    assert {by_i[i] for i in "012"} <= {"kept", "not kept"} and "kept" in by_i.values()
    assert list(table["rank"]) == sorted(table["rank"]) and table.val_accuracy.is_monotonic_decreasing
    m = r.data.metrics
    # the default rule scores the soup and the best ingredient on the same half of val: never below
    assert m["n_usable"] == 3 and m["val_gain_over_best_ingredient"] >= 0
    assert {
        "test_accuracy",
        "uniform_val_accuracy",
        "uniform_test_accuracy",
        "best_ingredient_test_accuracy",
    } <= set(m)
    curve = client.get_metric_history(r.info.run_id, "soup_val_accuracy")
    steps = [p.step for p in curve]  # the soup of the top k on half A (prefixes abandoned early: none)
    assert steps[0] == 1 and steps == sorted(set(steps)) and set(steps) <= {1, 2, 3}
    assert (
        r.data.params["method"] == "greedy"
        and r.data.params["tie"] == "ge"
        and r.data.params["candidates"] == "5"
    )
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"ingredients.csv", "soup_curve.png", "val_vs_test.png", "checkpoint"} <= arts
    version = client.get_model_version_by_alias("tiny-soup", "champion")
    assert version.run_id == r.info.run_id and "first champion" in out.stdout
    ckpt = load_checkpoint(
        Path(client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(world["work"])))
    )
    assert ckpt.split == runs["0"].data.tags["soups.split"]
    # the registered model loads by alias and predicts images
    os.environ["MLFLOW_TRACKING_URI"] = world["uri"]
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-soup@champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    import base64
    import io

    from PIL import Image

    def png(w: int, h: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (40, 90, 160)).save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()

    pred = model.predict(pd.DataFrame({"image": [png(40, 30), png(17, 64)]}))  # as its signature says
    assert list(pred.columns) == ["label", "class_name", "probability"] and len(pred) == 2
    assert model.metadata.get_input_schema().input_names() == ["image"]


def test_second_soup_downloads_nothing_and_a_tie_keeps_the_champion(world):
    soup(world)
    first = last_soup(world["client"])
    out = soup(world)
    second = last_soup(world["client"])
    assert second.data.metrics["checkpoints_downloaded"] == 0
    assert second.data.metrics["val_accuracy"] == first.data.metrics["val_accuracy"]
    assert "stays" in out.stdout
    champion = world["client"].get_model_version_by_alias("tiny-soup", "champion")
    assert champion.run_id != second.info.run_id


def test_a_replaced_checkpoint_fails_its_sha256_and_is_skipped(world, tmp_path):
    victim = world["runs"]["1"].info.run_id
    cache = world["work"] / "cache" / "checkpoints" / victim / "model.pt"
    stored = next(f for f in (world["work"] / "artifacts").rglob("model.pt") if victim in str(f))
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-10] + b"0123456789")
        cache.unlink(missing_ok=True)
        soup(world, "-P", "method=uniform")
        r = last_soup(world["client"])
        table = pd.read_csv(
            world["client"].download_artifacts(r.info.run_id, "ingredients.csv", str(tmp_path))
        )
        row = table[table.run_id == victim].iloc[0]
        assert row.status == "skipped" and "sha256" in row.reason
        assert r.data.params["method"] == "uniform" and r.data.metrics["n_ingredients"] == 2
    finally:
        stored.write_bytes(original)


def test_evaluate_logs_test_scores_into_the_runs(world, tmp_path):
    out = sh(
        [sys.executable, "entrypoints/evaluate.py", "--recipe", str(world["recipe"])],
        world["uri"],
        world["work"] / "cache",
    )
    client = world["client"]
    exp = client.get_experiment_by_name("soupexp").experiment_id
    good = client.search_runs([exp], "tags.`soups.role` = 'ingredient' and attributes.status = 'FINISHED'")
    scored = [r for r in good if "test_accuracy" in r.data.metrics]
    assert len(scored) == 4, "every finished ingredient except the one without checkpoint"
    assert all(
        {"test_f1", "test_loss", "test_mask_error", "test_gender_error", "test_age_error"}
        <= set(r.data.metrics)
        for r in scored
    )
    ev = client.search_runs([exp], "tags.`soups.role` = 'evaluation'")[0]
    scores = pd.read_csv(client.download_artifacts(ev.info.run_id, "scores.csv", str(tmp_path)))
    assert len(scores) == 5 and scores.error.notna().sum() == 1
    arts = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"scores.csv", "per_class_errors.csv", "confusion", "mistakes"} <= arts
    assert len(client.list_artifacts(ev.info.run_id, "confusion")) == 4
    again = sh(
        [sys.executable, "entrypoints/evaluate.py", "--recipe", str(world["recipe"])],
        world["uri"],
        world["work"] / "cache",
    )
    assert "already has test scores" in again.stdout or "scored 1 run" in again.stdout
    assert "scored 5 run(s) on test" in out.stdout


def test_no_ingredients_is_a_one_line_error(world):
    out = soup(world, "-P", "filter=params.model = 'nothing'", check=False)
    assert out.returncode != 0
    assert "no finished ingredient runs in experiment" in out.stderr


def test_the_top_runs_split_decides(world, tmp_path):
    """Of two runs on different splits the lower-ranked is skipped; with one usable ingredient the
    soup is that ingredient and there is no uniform soup to report."""
    other = world["runs"]["4"].info.run_id
    soup(world, "-P", f"filter=attributes.run_id IN ('{other}', '{world['runs']['0'].info.run_id}')")
    r = last_soup(world["client"])
    table = pd.read_csv(world["client"].download_artifacts(r.info.run_id, "ingredients.csv", str(tmp_path)))
    assert len(table) == 2 and table.status.tolist()[0] == "kept" and table.status.tolist()[1] == "skipped"
    assert "split" in table.reason.tolist()[1]
    assert "uniform_val_accuracy" not in r.data.metrics, "one usable ingredient: no uniform soup to report"
