"""Data-parallel fine-tuning and resume with real processes: `torchrun` (through -P nproc=2) on
the CPU with the gloo backend, a SIGKILLed rank, a SIGKILLed fine-tune resumed in place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch

from tests.conftest import ROOT, TINY, make_fashion_mnist, write_recipe

pytestmark = pytest.mark.slow
RECIPE = {
    **TINY,
    "model": "test_efficientnet_gn",
    "epochs": 3,
    "aug": "medium",  # each image augmented from its position's seed: the same on any rank
}  # GroupNorm: no batch statistics


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    root = make_fashion_mnist(work / "fmnist", n_train=200)
    recipe = write_recipe(work / "r.yaml", experiment="ddp", data=str(root), layout="fashion-mnist", **RECIPE)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
        "SOUPS_HEARTBEAT_S": "2",  # a killed run counts as gone after 6 s, not 90
    }
    env.pop("MLFLOW_RUN_ID", None)
    return {"work": work, "recipe": recipe, "env": env}


def command(world, *args: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "entrypoints" / "finetune.py"),
        "--recipe",
        str(world["recipe"]),
        *args,
    ]


def finetune(world, *args: str) -> str:
    out = subprocess.run(command(world, *args), env=world["env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("ingredient run ")[-1].split()[0]


def client(world) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(world["env"]["MLFLOW_TRACKING_URI"])


def runs(world) -> dict:
    c = client(world)
    exp = c.get_experiment_by_name("ddp")
    return {r.info.run_id: r for r in c.search_runs([exp.experiment_id])} if exp else {}


def history(world, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(world).get_metric_history(run_id, key)]


def weights(world, run_id: str) -> dict:
    path = client(world).download_artifacts(run_id, "checkpoint/model.pt", str(world["work"] / run_id))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def single(world) -> str:
    """The uninterrupted one-process fine-tune every other run is compared with."""
    return finetune(world)


def test_two_processes_log_one_run_that_matches_one_process(world, single):
    before = set(runs(world))
    # `--start none` also proves the script's own options reach it (torchrun's parser would take
    # `--start` for an abbreviation of its `--start-method`).
    run_id = finetune(world, "--nproc", "2", "--start", "none")
    new = set(runs(world)) - before
    assert new == {run_id}, "exactly one MLflow run, however many ranks"
    one, two = client(world).get_run(single), client(world).get_run(run_id)
    assert two.info.status == "FINISHED" and two.data.params["processes"] == "2"
    assert one.data.params["processes"] == "1"
    differ = {k for k in one.data.params if one.data.params[k] != two.data.params.get(k)}
    assert differ == {"processes"}
    for key in ("train_loss", "val_loss", "val_accuracy"):
        a, b = history(world, single, key), history(world, run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-3, key
    # Each rank took half of every batch the single process took, augmented alike: the same steps,
    # up to the floating-point order of the gradient average (measured: losses within 2e-4, weights
    # 1.5e-4; with the ranks' augmentation drawn per process instead, 0.04 and 0.09).
    wa, wb = weights(world, single), weights(world, run_id)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def new_run(world, before: set, tag: str | None = None, metric: str | None = None):
    def found():
        for rid, r in runs(world).items():
            if (
                rid not in before
                and (tag is None or tag in r.data.tags)
                and (metric is None or metric in r.data.metrics)
            ):
                return r
        return None

    return found


def rank_processes(launcher: int) -> dict | None:
    """torchrun's worker processes by their RANK, once both exist."""
    ranks = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:  # a helper that came and went
            continue
        if rank is not None:
            ranks[rank] = child
    return ranks if set(ranks) == {"0", "1"} else None


def test_a_killed_rank_fails_the_run_without_a_checkpoint(world):
    before = set(runs(world))
    log = world["work"] / "killed-rank.log"
    proc = subprocess.Popen(
        command(world, "--nproc", "2", "--epochs", "30"),
        env=world["env"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = wait_for(new_run(world, before, metric="val_accuracy"), 300, "epoch 1 of the 2-rank run")
        ranks = wait_for(lambda: rank_processes(proc.pid), 30, "the two ranks")
        time.sleep(1.0)  # into epoch 2
        ranks["1"].send_signal(signal.SIGKILL)
        proc.wait(timeout=120)  # the bound: a rank that dies never hangs the others
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    after = client(world).get_run(run.info.run_id)
    assert proc.returncode != 0
    assert after.info.status == "FAILED", log.read_text()[-3000:]
    assert "soups.sha256" not in after.data.tags
    assert [f.path for f in client(world).list_artifacts(run.info.run_id, "checkpoint")] == []


def test_a_fine_tune_killed_after_epoch_1_resumes_in_place_to_the_same_checkpoint(world, single):
    before = set(runs(world))
    proc = subprocess.Popen(
        command(world, "--save_every", "1"),
        env=world["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run = wait_for(new_run(world, before, tag="soups.state_epoch"), 300, "the state after epoch 1")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rid = run.info.run_id
    killed = client(world).get_run(rid)
    # Killed once a state was saved: after epoch 1, or 2 when an epoch is quicker than the poll.
    assert killed.info.status == "RUNNING" and killed.data.tags["soups.state_epoch"] in ("1", "2")
    assert "soups.sha256" not in killed.data.tags
    time.sleep(6.5)  # three of its 2 s heartbeats missed: its process is gone
    assert finetune(world, "--resume", rid) == rid
    resumed, one = client(world).get_run(rid), client(world).get_run(single)
    assert resumed.info.status == "FINISHED"
    # A kill that lands after epoch 2's metrics were logged but before its state was kept resumes
    # from epoch 1 and trains epoch 2 again: its point is logged twice, with the same value.
    per_epoch = dict(history(world, rid, "val_accuracy"))
    assert sorted(per_epoch) == [1, 2, 3]
    assert per_epoch == dict(history(world, single, "val_accuracy"))
    # Same data order, same random state, same steps: the very checkpoint of the uninterrupted run.
    assert resumed.data.tags["soups.sha256"] == one.data.tags["soups.sha256"]
    assert resumed.data.metrics["best_val_accuracy"] == one.data.metrics["best_val_accuracy"]


def test_resume_refuses_a_run_whose_process_is_still_training(world):
    """Two processes would train and upload into one run: while the first one's heartbeat is
    fresh, `resume` says so in one line, with how long to wait."""
    before = set(runs(world))
    proc = subprocess.Popen(
        command(world, "--save_every", "1", "--epochs", "400"),
        env=world["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run = wait_for(new_run(world, before, tag="soups.state_epoch"), 300, "the state after epoch 1")
        twice = subprocess.run(
            command(world, "--resume", run.info.run_id), env=world["env"], capture_output=True, text=True
        )
        assert proc.poll() is None, "the first process was still training"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    last = twice.stderr.strip().splitlines()[-1]
    assert twice.returncode == 1 and last.startswith(
        f"Error: resume={run.info.run_id}: the run is RUNNING"
    ), last
    assert "its process said it was alive" in last and "resume again in" in last
    assert client(world).get_run(run.info.run_id).info.status == "RUNNING", "nothing ended the live run"


def test_two_processes_with_start_auto_make_the_start_together_then_the_member(world):
    """`-P nproc=2` into an experiment with no start: both ranks train the start (rank 0 logs it),
    then the member from it; one line of log, no torchrun traceback."""
    run_id = finetune(
        world, "--nproc", "2", "--start", "auto", "--start_epochs", "1", "--experiment", "ddp-auto"
    )
    c = client(world)
    exp = c.get_experiment_by_name("ddp-auto").experiment_id
    (start,) = c.search_runs([exp], "tags.`soups.role` = 'start'")
    member = c.get_run(run_id)
    assert start.info.status == member.info.status == "FINISHED"
    assert start.data.params["processes"] == member.data.params["processes"] == "2"
    assert member.data.tags["soups.start_run"] == start.info.run_id
