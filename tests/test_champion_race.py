"""Soup steps finishing together against one real `mlflow server`: whatever the interleaving, the
champion ends as the best version compared, and every version says what its promotion decided."""

import os
import random
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from soups import tracking
from tests.conftest import ROOT, mlflow_server

pytestmark = pytest.mark.slow  # real processes and a real server

# One soup step's ending, as `soup_step` runs it: the version is created pending (atomically, with
# its score), then promoted with a judge that scores the champion of its turn. Every soup here is
# scored on the same images, so a version's score is its tag.
WORKER = textwrap.dedent(
    """
    import sys, time
    import mlflow
    from soups import tracking

    name = sys.argv[1]
    tracking.configure()
    client = mlflow.MlflowClient()
    print("ready", flush=True)
    for line in sys.stdin:  # a round: this worker's score and the moment the round starts
        val, go = (float(x) for x in line.split())
        run = client.create_run("0").info  # a version's source lies in a run's artifacts
        while time.time() < go:  # every worker of the round starts together
            time.sleep(0.005)
        tags = {tracking.PROMOTION: tracking.PENDING, tracking.RANK_METRIC: str(val)}
        model = client.create_model_version(name, f"{run.artifact_uri}/model", run.run_id, tags=tags)
        version = int(model.version)

        def judge():  # a soup step scores the champion for a while: the window a race would use
            champ = tracking.champion(name)
            time.sleep(0.3)
            return champ and tracking.Rival(str(champ.version), float(champ.tags[tracking.RANK_METRIC]), "")

        print(tracking.promote(name, version, val, "s", judge).replace("\\n", " "), flush=True)
    """
)


def test_racing_soup_steps_always_leave_the_best_version_champion(tmp_path):
    """Soup steps finishing together, round after round: the champion is always the best version."""
    rounds = [
        [0.60, 0.70, 0.65],
        [0.72, 0.71, 0.74],
        [0.80, 0.80, 0.79],
        [0.70, 0.90, 0.85],
        [0.95, 0.91, 0.93],
    ]
    if os.environ.get("SOUPS_STRESS"):  # make stress: 15 more rounds of 4 at random
        rng = random.Random(0)
        rounds += [[round(rng.uniform(0.5, 0.99), 3) for _ in range(4)] for _ in range(15)]
    with mlflow_server(tmp_path) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        client = mlflow.MlflowClient(uri)
        client.create_registered_model("raced")
        # The workers live for every round: each imports mlflow and soups once (3-5 s), not once a round.
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, "raced"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(tmp_path / f"worker{k}.err").open("w"),  # a file: a full pipe would stall it
                text=True,
            )
            for k in range(max(map(len, rounds)))
        ]
        try:
            assert all(w.stdout.readline().strip() == "ready" for w in workers), failure(workers, tmp_path)
            best = 0.0
            for vals in rounds:
                go = time.time() + 1.5  # after every worker has created its run
                for w, v in zip(workers, vals, strict=False):
                    w.stdin.write(f"{v} {go}\n")
                    w.stdin.flush()
                decided = [w.stdout.readline().strip() for w in workers[: len(vals)]]
                assert all(decided), failure(workers, tmp_path)
                best = max(best, *vals)
                champ = tracking_champion(client)
                assert float(champ.tags[tracking.RANK_METRIC]) == best, (vals, decided)
        finally:
            for w in workers:
                w.stdin.close()
            assert [w.wait(timeout=60) for w in workers] == [0] * len(workers), failure(workers, tmp_path)
        versions = client.search_model_versions("name = 'raced'")
        assert len(versions) == sum(len(r) for r in rounds)
        assert all(v.tags[tracking.PROMOTION] != tracking.PENDING for v in versions)
        assert not any(v.tags[tracking.PROMOTION].startswith("not decided") for v in versions)


def failure(workers, tmp_path) -> str:
    """What the workers said on stderr, for an assertion's message (once they have ended)."""
    for w in workers:
        if w.poll() is None:
            w.kill()
    return " | ".join((tmp_path / f"worker{k}.err").read_text()[-1500:] for k in range(len(workers)))


def tracking_champion(client):
    return client.get_model_version_by_alias("raced", tracking.CHAMPION)
