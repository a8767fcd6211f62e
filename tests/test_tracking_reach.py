"""A tracking server that is down is said in one line within seconds, naming the URI without its
password; one that accepts connections but answers slowly still gets MLflow's own retries."""

import os
import socket
import subprocess
import sys

import pytest

from soups import SoupsError
from soups.tracking.server import CONNECT_WAIT_ENV, connect_wait_s, refused
from tests.conftest import ROOT, TINY, write_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_nobody_listens_on_is_refused_with_the_reason():
    assert refused(f"http://127.0.0.1:{free_port()}", wait_s=2) == "Connection refused"


def test_the_connect_wait_is_15_s_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(CONNECT_WAIT_ENV, raising=False)
    assert connect_wait_s() == 15
    monkeypatch.setenv(CONNECT_WAIT_ENV, "2.5")
    assert connect_wait_s() == 2.5
    for bad in ("nan", "inf", "0", "-3", "abc"):  # nan would wait forever, 0 never connect
        monkeypatch.setenv(CONNECT_WAIT_ENV, bad)
        with pytest.raises(SoupsError, match=f"SOUPS_CONNECT_WAIT_S='{bad}' must be a number of seconds"):
            connect_wait_s()


def test_a_server_that_accepts_but_does_not_answer_yet_is_not_refused():
    with socket.socket() as slow:
        slow.bind(("127.0.0.1", 0))
        slow.listen(1)  # accepts (the kernel's backlog) and never answers: slow, not down
        assert refused(f"http://127.0.0.1:{slow.getsockname()[1]}/", wait_s=2) is None


@pytest.mark.slow
def test_a_step_against_a_down_server_fails_in_one_line_without_the_password(tmp_path, mask_root):
    """MLflow's own retries on a refused connection took 260 s of warnings; the step says it
    after the connect wait (15 s; 3 s here), naming the URI with its password masked, and leaves
    nothing behind."""
    recipe = write_recipe(tmp_path / "r.yaml", experiment="down", data=str(mask_root), layout="mask", **TINY)
    uri = f"http://bob:s3cr3t@127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, CONNECT_WAIT_ENV: "3"}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)  # MLflow's defaults: 7 retries with backoff
    proc = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "finetune.py"), "--recipe", str(recipe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3 + 45,  # imports and the wait; MLflow's retries alone took 260 s
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Error: tracking server http://bob:***@127.0.0.1:{uri.rsplit(':', 1)[1]} ")
    assert "unreachable after 3 s" in lines[-1] and "Connection refused" in lines[-1], lines[-1]
    assert "s3cr3t" not in proc.stderr + proc.stdout and "Retrying" not in proc.stderr
    assert not list(tmp_path.rglob("model.pt*")), "no checkpoint from a step that never started"


def test_a_missing_service_skips_a_test_here_and_fails_it_under_ci(monkeypatch):
    """A PostgreSQL or Chromium test skips on a machine without them, saying why; under CI
    (.ci/run sets SOUPS_REQUIRE_SERVICES) the same test fails: CI never passes without them."""
    from tests.conftest import REQUIRE_SERVICES, service_missing

    monkeypatch.delenv(REQUIRE_SERVICES, raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        service_missing("PostgreSQL is not installed")
    monkeypatch.setenv(REQUIRE_SERVICES, "1")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is not installed.*failure, not a skip"):
        service_missing("PostgreSQL is not installed")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"export {REQUIRE_SERVICES}=1" in ci and "|| true" not in ci, "CI requires its services"
