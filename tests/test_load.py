"""Many fine-tunes at once against one tracking store: a real `mlflow server`, and a direct
`sqlite:///` URI on a store nobody has created yet. `make test` runs 4 processes, `make stress` 12
(SOUPS_LOAD_PROCESSES)."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from soups.models import load_checkpoint
from tests.conftest import ROOT, TINY, all_at_once, mlflow_server, postgres_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

PROCESSES = int(os.environ.get("SOUPS_LOAD_PROCESSES", "4"))


@pytest.mark.parametrize("store", ["server", "fresh sqlite"])
def test_concurrent_finetunes_all_finish_in_the_intended_experiment(store, tmp_path, mask_root):
    """All runs FINISHED in the recipe's experiment, all epoch metrics there, all checkpoints load."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        experiment="load",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 2},
        space={"seed": {"int": [0, 9999]}},
    )

    def swarm(uri: str) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SOUPS_CACHE": str(tmp_path / "cache")}
        env.pop("MLFLOW_RUN_ID", None)
        finetunes = [
            [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe), "--i", str(i)]
            for i in range(PROCESSES)
        ]
        all_at_once(finetunes, env, timeout=900, cwd=ROOT, stdout=subprocess.DEVNULL)
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == PROCESSES
        exp = client.get_experiment_by_name("load").experiment_id
        assert all(r.info.status == "FINISHED" and r.info.experiment_id == exp for r in runs)
        assert sorted(int(r.data.params["i"]) for r in runs) == list(range(PROCESSES))
        for r in runs:
            for metric in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
                assert [m.step for m in client.get_metric_history(r.info.run_id, metric)] == [1, 2]
            path = Path(
                client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(tmp_path / r.info.run_id))
            )
            assert load_checkpoint(path).num_classes == 18

    if store == "server":
        with mlflow_server(tmp_path) as uri:
            swarm(uri)
    else:
        db = tmp_path / "fresh" / "mlflow.db"
        assert not db.exists()
        swarm(f"sqlite:///{db}")


@pytest.mark.skipif(not os.environ.get("SOUPS_STRESS"), reason="100 clients and 8 sweep workers: make stress")
def test_hundred_logging_clients_then_an_eight_worker_sweep_lose_nothing_on_postgres(tmp_path):
    """100 clients at once (a run each: params, 100 metric steps, an artifact), then an 8-worker
    sweep, on one mlflow server on PostgreSQL: every run FINISHED, nothing lost
    (`python -m bench.tracking_load` gives the latency and throughput of the same load)."""
    from bench.tracking_load import database, logging_swarm, sweep_swarm

    with postgres_server() as server:
        with mlflow_server(tmp_path, backend=database(server, "mlflow"), workers=4) as uri:
            swarm = logging_swarm(uri, 100, 100)
            assert swarm.intact, swarm
            assert swarm.requests == 100 * 104
            sweep = sweep_swarm(uri, database(server, "optuna"), tmp_path, 8, 16)
            assert sweep.intact, sweep
