"""`mlflow run . -e finetune` end to end against a temporary tracking store, on a generated
mask-layout dataset with timm's tiny test_efficientnet."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from soups.data import make_splits
from soups.layouts import read_layout
from soups.models import load_checkpoint, sha256
from tests.conftest import ROOT, TINY, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

VENV_BIN = str(Path(sys.executable).parent)


def run(args, tracking_uri, cwd=ROOT, **env):
    environ = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        **env,
    }
    environ.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


@pytest.fixture
def recipe(tmp_path, mask_root):
    return write_recipe(
        tmp_path / "tiny.yaml",
        experiment="tiny",
        data=str(mask_root),
        layout="mask",
        **TINY,
        space={"lr": {"log_uniform": [1e-3, 1e-2]}, "seed": {"int": [0, 1000]}},
    )


def only_run(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_run_finetune_logs_the_contract(tmp_path, tracking_uri, recipe, mask_root):
    out = run(
        [
            f"{VENV_BIN}/mlflow",
            "run",
            ".",
            "-e",
            "finetune",
            "-P",
            "i=3",
            "-P",
            f"recipe={recipe}",
            "-P",
            "lr=1e-2",
            "--env-manager",
            "local",
            "--experiment-name",
            "it",
        ],
        tracking_uri,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client, r = only_run(tracking_uri)
    assert r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == "it"
    p = r.data.params
    assert p["i"] == "3" and p["lr"] == "1e-2" and p["model"] == "test_efficientnet" and p["layout"] == "mask"
    assert p["seed"] != "0", "seed drawn for i=3"
    assert int(p["n_train"]) > 0 and p["num_classes"] == "18"
    assert r.data.tags["soups.role"] == "ingredient"
    history = client.get_metric_history(r.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_f1"} <= set(r.data.metrics)
    path = Path(client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(tmp_path)))
    assert sha256(path) == r.data.tags["soups.sha256"]
    ckpt = load_checkpoint(path)
    assert ckpt.model == "test_efficientnet" and ckpt.num_classes == 18 and len(ckpt.classes) == 18
    splits = make_splits(read_layout("mask", mask_root), 0.25, 0.25, 0)
    assert ckpt.split == r.data.tags["soups.split"] == splits.fingerprint
    # the ranking metric as MLflow reports it is the logged checkpoint's own score
    model = ckpt.build().eval()
    from soups.data import decode
    from soups.evaluate import EvalSet, metrics, predict

    val = EvalSet.from_decoded(decode(splits.val, ckpt.img_size), 18)
    assert (
        metrics(predict(model, val, ckpt.mean, ckpt.std), val.labels)["accuracy"]
        == r.data.metrics["val_accuracy"]
    )
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(r.info.run_id)]


def test_standalone_failure_ends_the_run_failed_without_checkpoint(tmp_path, tracking_uri, recipe, mask_root):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(mask_root), str(broken)], check=True)
    victim = next((broken / "train" / "images").iterdir()) / "mask1.jpg"
    victim.write_bytes(b"")
    out = run(
        [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe), "--data", str(broken)],
        tracking_uri,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot read image") and str(victim) in last
    client, r = only_run(tracking_uri)
    assert r.info.status == "FAILED" and client.get_experiment(r.info.experiment_id).name == "tiny"
    assert client.list_artifacts(r.info.run_id, "checkpoint") == []
    assert "soups.sha256" not in r.data.tags


@pytest.mark.parametrize("cache_mb", ["2048", "0"], ids=["decoded-once", "decoded-each-epoch"])
def test_skip_bad_trains_around_unreadable_images(tmp_path, tracking_uri, recipe, mask_root, cache_mb):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(mask_root), str(broken)], check=True)
    for folder in list((broken / "train" / "images").iterdir())[:6]:
        (folder / "normal.png").write_bytes(b"not a png")
    splits = make_splits(read_layout("mask", broken), 0.25, 0.25, 0)
    used = [k for k in splits.train.keys + splits.val.keys if k.endswith("normal.png")]
    bad = [k for k in used if (broken / k).read_bytes() == b"not a png"]
    assert bad, "some broken image falls in train or val"
    out = run(
        [
            sys.executable,
            "entrypoints/finetune.py",
            "--recipe",
            str(recipe),
            "--data",
            str(broken),
            "--skip_bad",
            "true",
            "--epochs",
            "1",
            "--cache_mb",
            cache_mb,  # 0: the training images are decoded every epoch, in loader processes
            "--workers",
            "2",
        ],
        tracking_uri,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    _, r = only_run(tracking_uri)
    assert r.info.status == "FINISHED" and r.data.params["skipped_images"] == str(len(bad))


def test_a_mistyped_option_is_one_line_with_the_closest_name(tracking_uri, recipe):
    """(A bad value, an unknown model and the rest: tests/test_bad_input.py.)"""
    out = run(
        [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe), "--lrr", "0.1"], tracking_uri
    )
    assert out.returncode != 0 and "No such option '--lrr'. Did you mean '--lr'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_ctrl_c_ends_the_run_killed_without_checkpoint(tracking_uri, recipe, tmp_path):
    import signal
    import time

    # stderr to a file: an undrained pipe fills with progress bars and stalls the child. Python's
    # faulthandler prints every thread's stack on SIGABRT: a hang shows where it hangs.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONFAULTHANDLER": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    log = tmp_path / "finetune.err"
    proc = subprocess.Popen(
        [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe), "--epochs", "500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    client = mlflow.MlflowClient(tracking_uri)
    deadline, started = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None and not started:
        time.sleep(0.5)  # until training is under way: an epoch has been logged
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        started = bool(runs) and "val_accuracy" in runs[0].data.metrics
    assert started, f"no epoch logged in 120 s: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=30)
        stacks = log.read_text()[-6000:]
        raise AssertionError(f"still running 60 s after Ctrl-C; its stacks: {stacks}") from None
    err = log.read_text()
    assert proc.returncode != 0, err[-2000:]
    _, r = only_run(tracking_uri)
    assert r.info.status == "KILLED"
    assert client.list_artifacts(r.info.run_id, "checkpoint") == []
