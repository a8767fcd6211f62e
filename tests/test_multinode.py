"""More than one machine, tried on one: two torchrun "nodes" of one process each, meeting through
torchrun's c10d rendezvous on 127.0.0.1 (what two machines do with the first one's address), as
one fine-tune: one MLflow run that rank 0 logs, the same steps as one process, and a node killed
mid-run fails that run with no checkpoint. `make stress` runs these (SOUPS_STRESS=1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import test_distributed as ddp
from tests.conftest import ROOT, free_port
from tests.test_distributed import client, history, new_run, runs, wait_for, weights

world, single = ddp.world, ddp.single  # the same fixtures, made again for this module

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SOUPS_STRESS"), reason="two-node runs: make stress"),
]


def node(world, port: int, host: bool, *args: str) -> subprocess.Popen:
    """One "node": its own torchrun agent with one process, meeting the other at 127.0.0.1:port
    (`is_host`: this agent serves the rendezvous store, as the first machine would)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=soups-two-nodes",
        f"--rdzv_conf=is_host={int(host)}",
        "--max_restarts=0",
        "--",
        str(ROOT / "entrypoints" / "finetune.py"),
        "--recipe",
        str(world["recipe"]),
        *args,
    ]
    log = (world["work"] / f"node-{port}-{int(host)}.log").open("w")
    return subprocess.Popen(
        command, env=world["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def log_of(world, port: int) -> str:
    return "\n".join((world["work"] / f"node-{port}-{h}.log").read_text()[-2000:] for h in (1, 0))


def kill_node(launcher: int) -> None:
    """The machine gone: its torchrun agent and every worker (they run in sessions of their own,
    so killing the agent's process group would leave them training)."""
    import psutil

    agent = psutil.Process(launcher)
    for process in [*agent.children(recursive=True), agent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def worker_rank(launcher: int) -> str | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if (rank := child.environ().get("RANK")) is not None:
                return rank
        except psutil.Error:
            continue
    return None


def test_two_nodes_on_loopback_are_one_fine_tune_that_matches_one_process(world, single):
    """Two torchrun nodes (c10d rendezvous on 127.0.0.1) train one run, rank 0 logging, with the
    single process's metrics."""
    before, port = set(runs(world)), free_port()
    nodes = [node(world, port, True), node(world, port, False)]
    try:
        codes = [n.wait(timeout=600) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_node(n.pid)
    assert codes == [0, 0], log_of(world, port)
    (run_id,) = set(runs(world)) - before
    run = client(world).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["processes"] == "2"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        a, b = history(world, single, key), history(world, run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3], "rank 0 alone logs each epoch"
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-3, key
    wa, wb = weights(world, single), weights(world, run_id)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3


def test_a_killed_node_fails_the_run_without_a_checkpoint(world):
    """The node without rank 0 SIGKILLed in epoch 2: the run ends FAILED, no checkpoint, and the
    surviving node exits non-zero instead of hanging."""
    before, port = set(runs(world)), free_port()
    nodes = [node(world, port, True, "--epochs", "30"), node(world, port, False, "--epochs", "30")]
    try:
        run = wait_for(new_run(world, before, metric="val_accuracy"), 300, "epoch 1 of the two-node run")
        ranks = {worker_rank(n.pid): n for n in nodes}
        assert set(ranks) == {"0", "1"}, ranks
        kill_node(ranks["1"].pid)
        survivor = ranks["0"]
        survivor.wait(timeout=360)  # the bound: a peer that vanishes never hangs the other node
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_node(n.pid)
    after = client(world).get_run(run.info.run_id)
    assert survivor.returncode != 0
    assert after.info.status == "FAILED", log_of(world, port)
    assert "soups.sha256" not in after.data.tags
    assert [f.path for f in client(world).list_artifacts(run.info.run_id, "checkpoint")] == []
