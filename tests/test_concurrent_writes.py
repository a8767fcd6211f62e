"""Processes writing the same rows of one tracking server at the same moment: MLflow writes tags
and latest metrics as read-then-insert, and the slower insert of a pair fails with a unique-key
error (found by `bench.tracking_load`: one of 8 sweep workers died describing the experiment)."""

import os
import sys
import textwrap
import time

import mlflow
import pytest

from tests.conftest import ROOT, all_at_once, mlflow_server

pytestmark = pytest.mark.slow  # real processes and a real server

# Every worker of a sweep that sees the study complete sums it up into the parent run, and every
# run started in a new experiment describes it: here all at once, in several rounds.
WRITER = textwrap.dedent(
    """
    import sys, time
    from soups import tracking
    from soups.tracking.lifecycle import describe_experiment

    parent, go, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    tracking.configure()
    run = tracking.Run(parent)
    for k in range(rounds):
        while time.time() < go + k:
            time.sleep(0.002)
        experiment = tracking.ensure_experiment(f"fresh-{k}")
        describe_experiment(experiment, f"note {k} from {sys.argv[4]}")
        tracking.log_sweep_best(run, 0.5, k, "abc", {f"p{k}": k})
    """
)


def test_writers_of_the_same_rows_at_the_same_moment_all_succeed(tmp_path):
    processes, rounds = 6, 4
    with mlflow_server(tmp_path, workers=2) as uri:
        client = mlflow.MlflowClient(uri)
        parent = client.create_run("0").info.run_id
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        go = time.time() + 5  # after every writer has imported soups (about 2 s here)
        writers = [
            [sys.executable, "-c", WRITER, parent, str(go), str(rounds), str(j)] for j in range(processes)
        ]
        all_at_once(writers, env, timeout=120)
        run = client.get_run(parent)
        best = client.get_metric_history(parent, "best_trial")
        assert {m.value for m in best} == set(range(rounds))
        assert {f"p{k}" for k in range(rounds)} <= {k.split(".")[-1] for k in run.data.tags}
        for k in range(rounds):
            # one writer's description, whole: a later writer never replaces it
            tags = client.get_experiment_by_name(f"fresh-{k}").tags
            assert tags["mlflow.note.content"] in {f"note {k} from {j}" for j in range(processes)}
