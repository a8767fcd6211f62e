"""Soup steps finishing together against one real `mlflow server`: whatever the interleaving, the
champion ends as the best version compared, and every version says what its promotion decided."""

import os
import queue
import random
import subprocess
import sys
import textwrap
import threading
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
        with Workers(max(map(len, rounds)), env, tmp_path) as workers:
            assert workers.answers(len(workers.procs)) == ["ready"] * len(workers.procs)
            best = 0.0
            for vals in rounds:
                go = time.time() + 1.5  # after every worker has created its run
                for k, v in enumerate(vals):
                    workers.say(k, f"{v} {go}")
                decided = workers.answers(len(vals))
                best = max(best, *vals)
                champ = tracking_champion(client)
                assert float(champ.tags[tracking.RANK_METRIC]) == best, (vals, decided)
        versions = client.search_model_versions("name = 'raced'")
        assert len(versions) == sum(len(r) for r in rounds)
        assert all(v.tags[tracking.PROMOTION] != tracking.PENDING for v in versions)
        assert not any(v.tags[tracking.PROMOTION].startswith("not decided") for v in versions)


class Workers:
    """The racing processes: a line to one worker starts its round; its answers come back through
    a reader thread each, so that a worker that hangs fails the test in 120 s, not never."""

    def __init__(self, n: int, env: dict, tmp_path):
        self.logs = [tmp_path / f"worker{k}.err" for k in range(n)]  # files: a full pipe would stall one
        self.procs = []
        for log in self.logs:
            with log.open("w") as err:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, "raced"],
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                    )
                )
        self.lines = queue.Queue()
        for k, p in enumerate(self.procs):
            threading.Thread(
                target=lambda k=k, p=p: [self.lines.put((k, x.strip())) for x in p.stdout], daemon=True
            ).start()

    def say(self, k: int, line: str) -> None:
        self.procs[k].stdin.write(line + "\n")
        self.procs[k].stdin.flush()

    def answers(self, n: int, timeout: float = 120) -> list[str]:
        """The next line of each of the first `n` workers, in worker order."""
        got = {}
        try:
            while len(got) < n:
                k, line = self.lines.get(timeout=timeout)
                if line is None:
                    raise AssertionError(f"worker {k} ended: {self.stderr()}")
                got[k] = line
        except queue.Empty:
            raise AssertionError(f"no answer in {timeout:.0f} s: {self.stderr()}") from None
        return [got[k] for k in range(n)]

    def stderr(self) -> str:
        return " | ".join(log.read_text()[-1500:] for log in self.logs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.stdin.close()
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        if exc[0] is None:  # a failure inside says more than the exit codes it caused
            assert codes == [0] * len(codes), self.stderr()


def tracking_champion(client):
    return client.get_model_version_by_alias("raced", tracking.CHAMPION)
