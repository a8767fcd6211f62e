"""Sweep workers that die or start together: real worker processes on one SQLite Optuna storage."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml

from soups import tracking
from tests.conftest import ROOT, TINY, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

SPACE = {"lr": {"log_uniform": [1e-3, 1e-2]}, "seed": {"int": [0, 1000]}}


@pytest.fixture
def setup(tmp_path, tracking_uri, fmnist_root):
    recipe = write_recipe(
        tmp_path / "tiny.yaml",
        experiment="faults",
        data=str(fmnist_root),
        layout="fashion-mnist",
        **{**TINY, "epochs": 1},
        space=SPACE,
    )
    mlflow.MlflowClient().create_experiment("faults")  # once, before the workers
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_RUN_ID", None)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    return dict(recipe=recipe, env=env, storage=storage)


def worker(setup, *extra):
    return [
        sys.executable,
        "entrypoints/sweep.py",
        "--recipe",
        str(setup["recipe"]),
        "--storage",
        setup["storage"],
        "--pruner",
        "none",
        "--soup",
        "none",  # these tests are about the trials; tests/test_sweep.py has the sweep's soups
        *extra,
    ]


def test_a_worker_killed_mid_trial_is_failed_retried_and_the_sweep_completes(setup, tmp_path):
    slow = write_recipe(
        tmp_path / "slow.yaml", **{**yaml.safe_load(setup["recipe"].read_text()), "epochs": 30}
    )
    args = worker({**setup, "recipe": slow}, "--trials", "2", "--study", "killed", "--heartbeat", "1")
    first = subprocess.Popen(
        args, cwd=ROOT, env=setup["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while True:  # until trial 0 runs and has named its MLflow run
        try:
            trials = optuna.load_study(study_name="killed", storage=setup["storage"]).get_trials()
        except KeyError:
            trials = []
        if any(t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in trials):
            break
        assert time.time() < deadline and first.poll() is None, "the first worker never started a trial"
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_run = next(t for t in trials if t.state.name == "RUNNING").user_attrs["mlflow_run_id"]
    time.sleep(3)  # past the grace period: twice the heartbeat
    fast = worker(setup, "--trials", "2", "--study", "killed", "--heartbeat", "1")
    second = subprocess.run(fast, cwd=ROOT, env=setup["env"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "this worker ran 2 trial(s)" in second.stdout
    trials = optuna.load_study(study_name="killed", storage=setup["storage"]).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    client = mlflow.MlflowClient()
    dead = client.get_run(killed_run)
    assert dead.info.status == "FAILED" and "stopped sending heartbeats" in dead.data.tags[tracking.STOPPED]
    retry = client.get_run(trials[2].user_attrs["mlflow_run_id"])
    assert retry.data.params["i"] == "0", "the retry trains the member the killed trial drew"
    assert retry.info.status == "FINISHED" and tracking.SHA256 in retry.data.tags
    parent = client.get_run(retry.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and "best_val_accuracy" in parent.data.metrics


def test_tpe_workers_started_together_draw_different_hyperparameters(setup, tmp_path):
    # Trials of 6 epochs (2-4 s here): the second worker, which waits for the first to name the
    # parent run (0.6-1 s later), asks while the first trains (1-epoch trials were both run by the first).
    longer = write_recipe(
        tmp_path / "longer.yaml", **{**yaml.safe_load(setup["recipe"].read_text()), "epochs": 6}
    )
    args = worker({**setup, "recipe": longer}, "--trials", "2", "--study", "tpe", "--sampler", "tpe")
    procs = [
        subprocess.Popen(
            args, cwd=ROOT, env=setup["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    ran = [out.split(";")[0] for out, _ in outs]
    assert all(r.endswith("this worker ran 1 trial(s)") for r in ran), [(o[:200], e[-1500:]) for o, e in outs]
    trials = optuna.load_study(study_name="tpe", storage=setup["storage"]).get_trials()
    drawn = [(round(t.params["lr"], 12), t.params["seed"]) for t in trials]
    assert len(trials) == 2 and len(set(drawn)) == 2, drawn


def test_a_retried_trial_resumes_its_killed_run_in_place(setup, tmp_path):
    """With save_every, the retry of a killed trial continues the first attempt's run from its
    last training state instead of training the member again from the start."""
    keeping = write_recipe(
        tmp_path / "keep.yaml",
        **{**yaml.safe_load(setup["recipe"].read_text()), "epochs": 4, "save_every": 1},
    )
    args = worker({**setup, "recipe": keeping}, "--trials", "1", "--study", "resumed", "--heartbeat", "1")
    first = subprocess.Popen(
        args, cwd=ROOT, env=setup["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client, deadline, run_id = mlflow.MlflowClient(), time.time() + 180, None
    while run_id is None or tracking.STATE_EPOCH not in client.get_run(run_id).data.tags:
        try:
            trials = optuna.load_study(study_name="resumed", storage=setup["storage"]).get_trials()
            run_id = next((t.user_attrs.get("mlflow_run_id") for t in trials), None)
        except KeyError:
            pass
        assert time.time() < deadline and first.poll() is None, "no training state was kept"
        time.sleep(0.3)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3)  # past the grace period: twice the heartbeat
    second = subprocess.run(args, cwd=ROOT, env=setup["env"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    trials = optuna.load_study(study_name="resumed", storage=setup["storage"]).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["mlflow_run_id"] == run_id, "the retry continued the same run"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and tracking.SHA256 in run.data.tags
    assert tracking.STOPPED not in run.data.tags, "a resumed run no longer says it was stopped"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "val_accuracy")})
    assert steps == [1, 2, 3, 4]
