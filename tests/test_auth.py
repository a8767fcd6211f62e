"""A team server with basic auth (`mlflow server --app-name basic-auth` on 127.0.0.1): the steps
work with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and fail in one line without."""

import contextlib
import os
import sqlite3
import subprocess
import sys

import pytest
from werkzeug.security import generate_password_hash

from tests.conftest import ROOT, TINY, mlflow_server, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

PASSWORD = "s3cret-Passw0rd"


def cheap_password_checks(db) -> None:
    """The server checks the password of every request against a scrypt hash (about 70 ms each,
    hundreds of requests a step). What is tested here is the credentials, not the hashing: store
    the admin's password as a one-round PBKDF2 hash, which the server verifies the same way."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        changed = con.execute(
            "UPDATE users SET password_hash = ? WHERE username = 'admin'",
            (generate_password_hash(PASSWORD, "pbkdf2:sha256:1"),),
        ).rowcount
    assert changed == 1


def test_basic_auth_server(tmp_path, mask_root):
    """basic-auth server: steps work with credentials; without or with a wrong password, one line."""
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
    }
    recipe = write_recipe(
        tmp_path / "r.yaml",
        experiment="auth",
        data=str(mask_root),
        layout="mask",
        registered_model="auth-soup",
        **{**TINY, "epochs": 1},
    )
    with mlflow_server(tmp_path, "--app-name", "basic-auth", env=server_env) as uri:
        cheap_password_checks(tmp_path / "basic_auth.db")

        def step(script, *args, **creds):
            env = {
                **os.environ,
                "MLFLOW_TRACKING_URI": uri,
                "SOUPS_CACHE": str(tmp_path / "cache"),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                **creds,
            }
            for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                if k not in creds:
                    env.pop(k, None)
            return subprocess.run(
                [sys.executable, f"entrypoints/{script}.py", "--recipe", str(recipe), *args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )

        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        # One ingredient is enough: every request of a step is checked against a password hash on
        # this server, which makes each step slow; what is tested is the credentials, not soups.
        out = step("finetune", "--i", "0", **admin)
        assert out.returncode == 0, out.stderr[-2000:]
        out = step("greedy_soup", **admin)
        assert out.returncode == 0 and "first champion" in out.stdout, out.stderr[-2000:]

        anonymous = step("greedy_soup")
        assert anonymous.returncode == 1 and "Traceback" not in anonymous.stderr
        assert anonymous.stderr.strip().splitlines()[-1] == (
            f"Error: tracking server {uri} refused access (no credentials given): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        wrong = step("greedy_soup", MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="guess")
        assert wrong.returncode == 1 and "user 'admin' was refused" in wrong.stderr.strip().splitlines()[-1]
