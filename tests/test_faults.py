"""Faults against real processes: a fine-tune killed with SIGKILL, and a tracking server that
goes away in the middle of a fine-tune."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from soups.models import load_checkpoint, sha256
from tests.conftest import ROOT, TINY, mlflow_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers


def start_finetune(recipe, uri, cwd, **env):
    environ = {**os.environ, "MLFLOW_TRACKING_URI": uri, **env}
    environ.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "entrypoints" / "finetune.py"), "--recipe", str(recipe)],
        cwd=cwd,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epoch(client, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and "val_accuracy" in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.3)
    raise AssertionError(
        f"no epoch logged: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    )


def test_sigkill_mid_training_leaves_no_ingredient_and_no_checkpoint(tmp_path, tracking_uri, mask_root):
    """kill -9 mid-epoch: run never an ingredient, no partial checkpoint, the good run still ranks."""
    from soups import tracking

    good = write_recipe(
        tmp_path / "good.yaml", experiment="faults", data=str(mask_root), layout="mask", **TINY
    )
    done = start_finetune(good, tracking_uri, tmp_path)
    assert done.wait(timeout=300) == 0
    slow = write_recipe(
        tmp_path / "slow.yaml",
        experiment="faults",
        data=str(mask_root),
        layout="mask",
        **{**TINY, "epochs": 500},
    )
    proc = start_finetune(slow, tracking_uri, tmp_path)
    client = mlflow.MlflowClient(tracking_uri)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:  # wait for the second run's first epoch
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"
        )
        victim = next((r for r in runs if "val_accuracy" in r.data.metrics), None)
        time.sleep(0.3)
    assert victim is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    victim = client.get_run(victim.info.run_id)
    assert victim.info.status == "RUNNING" and client.list_artifacts(victim.info.run_id, "checkpoint") == []
    ranked = tracking.ranked_ingredients(victim.info.experiment_id)
    assert [r.info.run_id for r in ranked] != [] and victim.info.run_id not in {r.info.run_id for r in ranked}
    files = [str(p) for p in tmp_path.rglob("*model.pt*")]
    assert files and all(ranked[0].info.run_id in f for f in files), (
        f"only the good run's checkpoint: {files}"
    )


def test_server_gone_mid_finetune_keeps_the_weights_locally(tmp_path, mask_root):
    """Server killed mid-training: exit 1, one line saying where the loadable checkpoint is kept."""
    recipe = write_recipe(
        tmp_path / "r.yaml", experiment="outage", data=str(mask_root), layout="mask", **{**TINY, "epochs": 12}
    )
    with mlflow_server(tmp_path) as uri:
        proc = start_finetune(
            recipe, uri, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"
        )
        wait_for_epoch(mlflow.MlflowClient(uri), proc)
        server = int((tmp_path / "server.pid").read_text())
        os.killpg(server, signal.SIGKILL)  # the server is gone, mid-training
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: tracking server") and "unreachable" in last and "kept at" in last, last
    kept = [p for p in (tmp_path / "unlogged-checkpoints").rglob("model.pt")]
    assert len(kept) == 1 and str(kept[0]) in last
    ckpt = load_checkpoint(kept[0])
    assert ckpt.model == "test_efficientnet" and sha256(kept[0])[:12] in last
