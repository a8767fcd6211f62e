"""Generated datasets on disk (real JPEG/PNG/IDX files) and tiny recipes for the tests."""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Checkpoints and logits the tests cache stay in a folder of this session (subprocesses
    inherit it): a developer's ~/.cache/soups never feeds a test logits computed by older code."""
    os.environ["SOUPS_CACHE"] = str(tmp_path_factory.mktemp("soups-cache"))


def write_image(path: Path, rng: np.random.Generator, shade: int, size=(24, 32)) -> None:
    """A real image whose mean colour carries the class, so tiny models can learn it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.full((*size, 3), shade, np.uint8)
    noise = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
    Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)).save(path)


MASK_STEMS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]


def make_mask_dataset(root: Path, persons: int = 12, seed: int = 0) -> Path:
    """<root>/train/images/<id>_<gender>_Asian_<age>/ with all seven images per person."""
    rng = np.random.default_rng(seed)
    ages = [20, 45, 65]
    for p in range(persons):
        gender = ("male", "female")[p % 2]
        folder = root / "train" / "images" / f"{p:06d}_{gender}_Asian_{ages[p % 3]}"
        for k, stem in enumerate(MASK_STEMS):
            ext = ".png" if k == 6 else ".jpg"
            mask = 0 if k < 5 else (1 if k == 5 else 2)
            write_image(folder / f"{stem}{ext}", rng, 40 + 80 * mask)
    return root


def make_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"{k:03d}.jpg", rng, 30 + 90 * c)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_recipe(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


TINY = dict(
    model="test_efficientnet",
    pretrained="none",
    img_size=32,
    batch_size=8,
    epochs=2,
    lr=3e-3,
    workers=0,
    val_ratio=0.25,
    test_ratio=0.25,
)


@pytest.fixture(scope="session")
def mask_root(tmp_path_factory) -> Path:
    return make_mask_dataset(tmp_path_factory.mktemp("mask"))


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(workdir: Path, *extra: str, env: dict | None = None, backend: str = "", workers: int = 1):
    """A real `mlflow server` on 127.0.0.1 (`backend`, by default SQLite in `workdir`; artifacts
    served from `workdir`), in its own process group, stopped with all its children afterwards."""
    import signal
    import subprocess
    import sys

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--backend-store-uri",
            backend or f"sqlite:///{workdir / 'server.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (workdir / "server.pid").write_text(str(proc.pid))
    try:
        wait_until_up(f"{uri}/health", proc, workdir / "server.log")
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def all_at_once(commands: list[list[str]], env: dict, timeout: float = 600, **popen) -> list[tuple[str, str]]:
    """Start every command at once and wait for all; each must exit 0 (the message: the failed
    ones' stderr tails). Returns (stdout, stderr) of each, in order."""
    import subprocess

    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    procs = [subprocess.Popen(c, env=env, **popen) for c in commands]
    outs = [p.communicate(timeout=timeout) for p in procs]
    failed = [
        f"command {k} ({' '.join(c[1:])[:80]}) exited {p.returncode}: {(e or '')[-1500:]}"
        for k, (c, p, (_, e)) in enumerate(zip(commands, procs, outs, strict=True))
        if p.returncode
    ]
    assert not failed, "\n".join(failed)
    return outs


REQUIRE_SERVICES = "SOUPS_REQUIRE_SERVICES"  # set by .ci/run: every service test must run


def service_missing(reason: str) -> None:
    """Skip a test whose real service (PostgreSQL, Chromium) is not installed, saying why; under
    CI (SOUPS_REQUIRE_SERVICES=1) fail it instead, so that CI never passes without them."""
    if os.environ.get(REQUIRE_SERVICES):
        pytest.fail(f"{reason}; {REQUIRE_SERVICES} is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_server(password: str | None = None):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package), as the postgres
    user when running as root; yields its SQLAlchemy URL (without the password, when the cluster
    has one: connections then need it) and removes the cluster afterwards."""
    import glob
    import shutil
    import subprocess
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        service_missing("PostgreSQL is not installed here (apt-get install postgresql; .ci/run installs it)")
    bindir = Path(bins[-1]).parent
    root = os.geteuid() == 0
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    work = Path(tempfile.mkdtemp(prefix="soups-pg-"))
    work.chmod(0o755)
    if root:
        shutil.chown(work, "postgres", "postgres")
    port = free_port()

    def pg(*args):
        subprocess.run([*as_pg, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        auth = ["-A", "trust"]
        if password:
            (work / "pw").write_text(password)
            if root:
                shutil.chown(work / "pw", "postgres", "postgres")
            auth = ["--auth-local", "trust", "--auth-host", "scram-sha-256", "--pwfile", str(work / "pw")]
        pg(str(bindir / "initdb"), "-D", str(work / "data"), *auth, "-U", "postgres")
        options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c max_connections=200"
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(work / "data"),
            "-o",
            options,
            "-l",
            str(work / "log"),
            "-w",
            "start",
        )
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(work / "data"), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_until_up(url: str, proc, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers, failing with the server's log if the process dies or the time
    runs out."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server at {url} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """`make stress` (SOUPS_STRESS=1): a table of scenario, expected (the test's docstring) and
    observed (what happened, with its time)."""
    if not os.environ.get("SOUPS_STRESS"):
        return
    rows = []
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call" and outcome == "passed":
                continue
            item = next((i for i in terminalreporter.config._stress_items if i.nodeid == report.nodeid), None)
            doc = (
                (item.function.__doc__ or "").strip().splitlines()[0]
                if item and item.function.__doc__
                else ""
            )
            rows.append(
                (report.nodeid.split("::", 1)[-1], doc or "passes", f"{outcome} ({report.duration:.0f} s)")
            )
    width = max((len(r[0]) for r in rows), default=10)
    terminalreporter.write_line("")
    terminalreporter.write_line(f"{'scenario':<{width}}  {'expected':<90}  observed")
    for scenario, expected, observed in rows:
        terminalreporter.write_line(f"{scenario:<{width}}  {expected[:90]:<90}  {observed}")


def pytest_collection_modifyitems(session, config, items):
    config._stress_items = list(items)
