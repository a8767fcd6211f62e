"""No secret in any run: the README's scale-out command against a real `mlflow server` and a real
PostgreSQL that wants a password, and hostile values that would reach a search filter or a path."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType

from soups import SoupsError, tracking
from tests.conftest import ROOT, TINY, mlflow_server, postgres_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

BIN = Path(sys.executable).parent
SECRET = "s3cr@t:pa/ss"  # an @, a : and a / that a careless mask lets through


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql+psycopg2://soups:pw@db/optuna", "postgresql+psycopg2://soups:***@db/optuna"),
        ("postgresql://soups:p@ss@db:5432/optuna", "postgresql://soups:***@db:5432/optuna"),
        ("postgresql://soups:a:b@db/optuna", "postgresql://soups:***@db/optuna"),
        (f"postgresql://soups:{SECRET}@db:1/optuna", "postgresql://soups:***@db:1/optuna"),
        ("postgresql://soups@db/optuna", "postgresql://soups@db/optuna"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ],
)
def test_without_password_masks_all_of_it(url, masked):
    assert tracking.without_password(url) == masked


def every_text_of_every_run(client, work: Path) -> str:
    """Params, tags and text artifacts of every run, deleted ones included."""
    texts = []
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for run in client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL):
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        local = Path(client.download_artifacts(run.info.run_id, "", str(work / run.info.run_id)))
        texts += [p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file()]
    return "\n".join(texts)


def sh(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_scale_out_as_the_readme_says_puts_no_password_in_any_run(tmp_path, fmnist_root):
    recipe = write_recipe(
        tmp_path / "tiny.yaml",
        experiment="secret",
        data=str(fmnist_root),
        layout="fashion-mnist",
        **{**TINY, "epochs": 1},
        space={"seed": {"int": [0, 99]}},
    )
    with postgres_server(password=SECRET) as storage, mlflow_server(tmp_path) as uri:
        client = mlflow.MlflowClient(uri)
        client.create_experiment("secret")
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "PGPASSWORD": SECRET,
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        env.pop("MLFLOW_RUN_ID", None)
        common = [
            "mlflow",
            "run",
            ".",
            "-e",
            "sweep",
            "--env-manager",
            "local",
            "--experiment-name",
            "secret",
        ]
        common += ["-P", f"recipe={recipe}", "-P", "trials=1", "-P", "pruner=none"]
        ok = sh([*common, "-P", f"storage={storage}"], env)
        assert ok.returncode == 0, ok.stderr[-2000:]
        texts = every_text_of_every_run(client, tmp_path / "dl")
        assert "trials=1" in texts and "storage=postgresql" in texts, "the search reads what runs hold"
        assert SECRET not in texts and "s3cr" not in texts
        # the password in -P: refused in one line, and the run that recorded it is deleted
        with_password = storage.replace("postgres@", f"postgres:{SECRET}@")
        refused = sh([*common, "-P", f"storage={with_password}", "-P", "study=other"], env)
        assert refused.returncode != 0
        (line,) = [x for x in refused.stderr.splitlines() if x.startswith("Error: storage=")]
        assert "carries a password" in line and "PGPASSWORD" in line and "s3cr" not in line
        (flagged,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "tags.`soups.holds_secret` != ''"
        )
        assert f"mlflow runs delete --run-id {flagged.info.run_id}" in line
        assert flagged.info.status == "FAILED" and "study" in flagged.data.params


@pytest.mark.parametrize("hostile", ["x' or tags.a = 'b", "../../etc", "abc def", ""])
def test_hostile_run_ids_never_reach_a_filter_or_a_path(hostile):
    with pytest.raises(SoupsError, match="is not a run id"):
        tracking.checked_run_id(hostile, "parent")
    if hostile:
        with pytest.raises(SoupsError, match="parent .* is not a run id"):
            tracking.parent_filter(hostile)


def test_quote_refuses_what_would_end_a_literal():
    assert tracking.quote("tf_efficientnet_lite0") == "'tf_efficientnet_lite0'"
    for bad in ("a'b", 'a"b', "a`b", "a\\b", "a\nb"):
        with pytest.raises(SoupsError, match="cannot be searched for"):
            tracking.quote(bad)
