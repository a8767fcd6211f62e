"""Tracking load, as a team puts it on one server: a real `mlflow server` on 127.0.0.1 (MLflow's
default 4 workers) backed by a real PostgreSQL, and

1. `--clients` logging clients at once, each its own process and its own run: params in one
   batch, `--steps` metric points one request each (as an epoch loop logs them), one artifact
   uploaded through the server, then FINISHED. The row gives the clients' request latency (p50 and
   p99 over every request) and the server's throughput (requests answered per second, from the
   first request to the last answer), and checks that nothing was lost: every run FINISHED with
   every metric point at its step with its value, every artifact there byte for byte.
2. `sweep` with `--sweep-workers` workers on the same server and an Optuna study in the same
   PostgreSQL: every trial COMPLETE and every trial's run FINISHED with every epoch's metrics.

Clients are forked after MLflow is imported (100 forks, not 100 imports on two cores).
`tests/test_load.py` runs both under `make stress`."""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import command, report

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "load"


def value(client: int, step: int) -> float:
    """The metric each client logs: checkable afterwards without anything sent back."""
    return client * 1000.0 + step + 0.25


def payload(client: int) -> bytes:
    return (f"client {client}\n" * 4000).encode()  # about 40 KB


def one_client(uri: str, experiment: str, client: int, steps: int, gate, out) -> None:
    """One logging client (in its own process): waits at `gate` so that all start together, then
    logs its run into `experiment` and puts (latencies in seconds, error or "") on `out`."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    latencies, error = [], ""

    def timed(call, *args, **kwargs):
        t = time.perf_counter()
        result = call(*args, **kwargs)
        latencies.append(time.perf_counter() - t)
        return result

    try:
        mlflow = MlflowClient(uri)
        gate.wait(timeout=300)
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        run = timed(mlflow.create_run, experiment_id, run_name=f"client-{client}")
        rid = run.info.run_id
        params = [Param("client", str(client)), Param("steps", str(steps)), Param("lr", "0.001")]
        timed(mlflow.log_batch, rid, params=params)
        for step in range(steps):
            timed(mlflow.log_metric, rid, "loss", value(client, step), step=step)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.bin"
            path.write_bytes(payload(client))
            timed(mlflow.log_artifact, rid, str(path))
        timed(mlflow.set_terminated, rid, "FINISHED")
    except Exception as e:  # noqa: BLE001 - reported, and counted as a lost run
        error = f"client {client}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out.put((client, latencies, error))


@dataclass(frozen=True)
class Swarm:
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: list[str]
    finished: int
    points_lost: int
    artifacts_missing: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def intact(self) -> bool:
        return (
            not self.errors
            and self.finished == self.clients
            and not self.points_lost + self.artifacts_missing
        )


def logging_swarm(uri: str, clients: int, steps: int, timeout_s: float = 900) -> Swarm:
    """`clients` forked processes logging at once to the server at `uri`, then the check of what
    the server kept."""
    from mlflow import MlflowClient

    # Forked before this process opens any connection (MLflow keys its HTTP session by process id
    # too): each client opens its own.
    experiment = f"{EXPERIMENT}-{time.time_ns()}"
    ctx = multiprocessing.get_context("fork")
    gate, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=one_client, args=(uri, experiment, k, steps, gate, out)) for k in range(clients)
    ]
    for p in procs:
        p.start()
    mlflow = MlflowClient(uri)
    experiment_id = mlflow.create_experiment(experiment)
    gate.wait(timeout=300)
    started = time.perf_counter()
    results = []
    for _ in procs:
        try:
            results.append(out.get(timeout=timeout_s))
        except queue.Empty:  # a client died without a word: its run counts as lost below
            break
    seconds = time.perf_counter() - started
    for p in procs:
        p.join(timeout=60)
    latencies = np.array([x for _, lat, _ in results for x in lat])
    errors = [e for _, _, e in results if e] + ["a client never reported"] * (clients - len(results))
    runs = mlflow.search_runs([experiment_id], max_results=clients + 10)
    if sorted(int(r.data.params.get("client", -1)) for r in runs) != list(range(clients)):
        errors.append(f"{len(runs)} runs on the server, not one per client")
    finished, lost, missing = 0, 0, 0
    for run in runs:
        k = int(run.data.params.get("client", -1))
        finished += run.info.status == "FINISHED"
        history = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "loss")}
        lost += sum(history.get(step) != value(k, step) for step in range(steps))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                got = Path(mlflow.download_artifacts(run.info.run_id, "weights.bin", tmp)).read_bytes()
            except Exception:  # noqa: BLE001 - counted
                got = b""
            missing += got != payload(k)
    lost += max(clients - len(runs), 0) * steps
    return Swarm(
        clients,
        len(latencies),
        seconds,
        float(np.percentile(latencies, 50) * 1000) if len(latencies) else float("nan"),
        float(np.percentile(latencies, 99) * 1000) if len(latencies) else float("nan"),
        errors,
        finished,
        lost,
        missing + max(clients - len(runs), 0),
    )


@dataclass(frozen=True)
class SweepLoad:
    workers: int
    trials: int
    seconds: float
    returncodes: list[int]
    complete: int
    finished: int
    epochs_lost: int
    stderr: str

    @property
    def intact(self) -> bool:
        return (
            self.returncodes == [0] * self.workers
            and self.complete == self.finished == self.trials
            and not self.epochs_lost
        )


def sweep_swarm(uri: str, storage: str, work: Path, workers: int, trials: int) -> SweepLoad:
    """`workers` sweep processes sharing one study of `trials` tiny fine-tunes (the test recipe:
    test_efficientnet, 32 px, 2 epochs, on generated mask-layout photos)."""
    import mlflow
    import optuna

    from tests.conftest import TINY, make_mask_dataset, write_recipe

    data = make_mask_dataset(work / "mask", persons=12)
    recipe = write_recipe(
        work / "load.yaml",
        experiment="sweepload",
        data=str(data),
        layout="mask",
        **TINY,
        space={"lr": {"log_uniform": [1e-3, 1e-2]}},
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SOUPS_CACHE": str(work / "cache")}
    env.pop("MLFLOW_RUN_ID", None)
    worker = [sys.executable, "entrypoints/sweep.py", "--recipe", str(recipe), "--trials", str(trials)]
    worker += ["--storage", storage, "--study", "load", "--pruner", "none", "--soup", "none"]
    started = time.perf_counter()
    logs = [work / f"sweep-worker-{k}.log" for k in range(workers)]  # files: a full pipe would stall it
    procs = [
        subprocess.Popen(worker, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for log in logs
    ]
    for p in procs:
        p.wait(timeout=1800)
    errs = [log.read_text() for log in logs]
    seconds = time.perf_counter() - started
    failed = "\n".join(e[-2000:] for p, e in zip(procs, errs, strict=True) if p.returncode)
    if all(p.returncode for p in procs):
        raise RuntimeError(f"every sweep worker failed:\n{failed}")
    study = optuna.load_study(study_name="load", storage=storage)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweepload")
    runs = client.search_runs([experiment.experiment_id], "tags.`soups.role` = 'ingredient'")
    finished = sum(r.info.status == "FINISHED" for r in runs)
    epochs = int(TINY["epochs"])
    lost = sum(
        epochs - len(client.get_metric_history(r.info.run_id, metric))
        for r in runs
        for metric in ("train_loss", "val_loss", "val_accuracy")
    )
    return SweepLoad(
        workers, trials, seconds, [p.returncode for p in procs], complete, finished, lost, failed
    )


def database(server: str, name: str) -> str:
    """A new database `name` on the PostgreSQL at `server` (an SQLAlchemy URL); its URL. MLflow and
    Optuna each keep their schema version in a table of the same name: one database each."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server.rsplit('/', 1)[0]}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100, help="logging clients at once (processes)")
    parser.add_argument("--steps", type=int, default=100, help="metric points each client logs")
    parser.add_argument("--sweep-workers", type=int, default=8, help="sweep processes sharing one study")
    parser.add_argument("--trials", type=int, default=16, help="trials of the sweep")
    args = parser.parse_args()
    from tests.conftest import mlflow_server, postgres_server

    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        print("tracking_load: skipped, it needs PostgreSQL (apt-get install postgresql)")
        return
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="soups-load-") as tmp, postgres_server() as server:
        work = Path(tmp)
        with mlflow_server(work, backend=database(server, "mlflow"), workers=4) as uri:
            swarm = logging_swarm(uri, args.clients, args.steps)
            print(f"logging clients: {swarm}")
            sweep = sweep_swarm(uri, database(server, "optuna"), work, args.sweep_workers, args.trials)
            print(f"sweep: {sweep}")
    per_client = f"create, params, {args.steps} metric steps, a 40 KB artifact, end"
    rows = [
        {
            "what": f"{args.clients} logging clients at once (processes; each a run: {per_client}) vs one "
            "mlflow server (4 workers) on PostgreSQL, loopback",
            "a": f"request latency p50 {swarm.p50_ms:.0f} ms",
            "b": f"p99 {swarm.p99_ms:.0f} ms",
            "ratio": f"{swarm.throughput:.0f} requests/s ({swarm.requests} in {swarm.seconds:.0f} s); "
            f"{swarm.finished}/{args.clients} FINISHED, {swarm.points_lost} points and "
            f"{swarm.artifacts_missing} artifacts lost, {len(swarm.errors)} client errors",
            "target": "every run FINISHED, nothing lost",
            "ok": swarm.intact,
        },
        {
            "what": f"sweep: {args.sweep_workers} workers, one Optuna study on the same PostgreSQL, "
            f"{args.trials} trials (test_efficientnet 32 px, 2 epochs) logging to the same server",
            "a": f"{sweep.complete}/{args.trials} trials COMPLETE",
            "b": f"{sweep.finished}/{args.trials} runs FINISHED, {sweep.epochs_lost} epoch metrics lost",
            "ratio": f"{args.trials / sweep.seconds * 60:.1f} trials/min ({sweep.seconds:.0f} s)",
            "target": "every trial COMPLETE, every run FINISHED, nothing lost",
            "ok": sweep.intact,
        },
    ]
    report("tracking_load", rows, command(), time.time() - started)
    if swarm.errors or sweep.stderr:
        print("\n".join(swarm.errors[:5]), sweep.stderr[-2000:], sep="\n")


if __name__ == "__main__":
    main()
