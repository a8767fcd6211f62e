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

    name, val, go = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    tracking.configure()
    client = mlflow.MlflowClient()
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

    print(tracking.promote(name, version, val, "s", judge))
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
        best = 0.0
        for vals in rounds:
            go = time.time() + 4  # after every worker has imported mlflow (about 2 s here)
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, "raced", str(v), str(go)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for v in vals
            ]
            outs = [p.communicate(timeout=120) for p in procs]
            assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
            best = max(best, *vals)
            champ = tracking_champion(client)
            assert float(champ.tags[tracking.RANK_METRIC]) == best, (vals, [o for o, _ in outs])
        versions = client.search_model_versions("name = 'raced'")
        assert len(versions) == sum(len(r) for r in rounds)
        assert all(v.tags[tracking.PROMOTION] != tracking.PENDING for v in versions)
        assert not any(v.tags[tracking.PROMOTION].startswith("not decided") for v in versions)


def tracking_champion(client):
    return client.get_model_version_by_alias("raced", tracking.CHAMPION)
