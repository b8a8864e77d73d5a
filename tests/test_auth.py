"""In compose mode both servers refuse requests without credentials. Checked against local equivalents of
the compose services: ``mlflow server --app-name basic-auth`` with the basic_auth.ini docker-compose.yml
generates (SQLite instead of Postgres) and the admin from MLFLOW_AUTH_ADMIN_*, and ``prefect server start``
with PREFECT_SERVER_API_AUTH_STRING, each on a free loopback port."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ADMIN, ADMIN_PASSWORD = "admin", "s3cret-admin-pw-for-tests"
PREFECT_AUTH = "herd:s3cret-prefect-auth"
ROOT = Path(__file__).resolve().parents[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, **extra}


def request(url: str, *, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if request(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn workers included) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def compose_auth_ini(database_uri: str) -> str:
    """The basic_auth.ini docker-compose.yml's mlflow service writes at start, rendered with the defaults
    of .env.example and, instead of Postgres, ``database_uri``."""
    import yaml

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = doc["services"]["mlflow"]["command"][-1].replace("$$", "$")
    ini = script[script.index("<<EOF\n") + 6:script.index("\nEOF\n")]
    values = {"MLFLOW_DEFAULT_PERMISSION": "READ", "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
              "MLFLOW_AUTH_CACHE_TTL_SECONDS": "60", "POSTGRES_PASSWORD": "unused"}
    ini = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], ini)
    ini, n = re.subn(r"(?m)^database_uri = .*$", f"database_uri = {database_uri}", ini)
    assert n == 1 and "[mlflow]" in ini, ini
    return ini + "\n"


def _has_flask_wtf() -> bool:
    import importlib.util

    return importlib.util.find_spec("flask_wtf") is not None


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Start both servers at once (each takes a while to come up); stop both at the end."""
    root = tmp_path_factory.mktemp("auth-servers")
    mlflow_port, prefect_port = _free_port(), _free_port()

    ini = root / "basic_auth.ini"
    ini.write_text(compose_auth_ini(database_uri=f"sqlite:///{root / 'basic_auth.db'}"))
    mlflow_env = _env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                      MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key")
    mlflow_argv = [_bin("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                   "--port", str(mlflow_port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    prefect_env = _env(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
                       PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                       PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
    prefect_argv = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
                    "--no-background", "--analytics-off"]

    started: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        if _has_flask_wtf():
            started["mlflow"] = (_start(mlflow_argv, mlflow_env, root / "mlflow.log"),
                                 f"http://127.0.0.1:{mlflow_port}", root / "mlflow.log")
        started["prefect"] = (_start(prefect_argv, prefect_env, root / "prefect.log"),
                              f"http://127.0.0.1:{prefect_port}/api", root / "prefect.log")
        yield started
    finally:
        for proc, _, _ in started.values():
            _stop(proc)


@pytest.fixture(scope="module")
def mlflow_url(launched) -> str:
    assert "mlflow" in launched, "Flask-WTF is not installed: MLflow's basic-auth app needs mlflow[auth] (a dependency)"
    proc, url, log = launched["mlflow"]
    _wait_healthy(proc, f"{url}/health", log)  # /health is open: the compose healthcheck relies on it
    return url


@pytest.fixture(scope="module")
def prefect_url(launched) -> str:
    proc, url, log = launched["prefect"]
    _wait_healthy(proc, f"{url}/health", log)  # /api/health is open too
    return url


MLFLOW_SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_mlflow_refuses_requests_without_credentials(mlflow_url):
    assert request(mlflow_url + MLFLOW_SEARCH)[0] == 401
    assert request(mlflow_url + MLFLOW_SEARCH, auth=(ADMIN, "wrong-password-123"))[0] == 401
    assert request(mlflow_url + MLFLOW_SEARCH, auth=("nobody", ADMIN_PASSWORD))[0] == 401
    status, body = request(mlflow_url + MLFLOW_SEARCH, auth=(ADMIN, ADMIN_PASSWORD))
    assert status == 200, body
    assert "experiments" in json.loads(body)
    # the password cache (auth_cache_ttl_seconds) remembers the right password only
    assert request(mlflow_url + MLFLOW_SEARCH, auth=(ADMIN, ADMIN_PASSWORD + "x"))[0] == 401


def test_prefect_refuses_requests_without_credentials(prefect_url):
    url = prefect_url + "/flows/filter"
    user, password = PREFECT_AUTH.split(":", 1)
    assert request(url, body={})[0] == 401
    assert request(url, body={}, auth=(user, "wrong"))[0] == 401
    status, body = request(url, body={}, auth=(user, password))
    assert status == 200, body
    assert json.loads(body) == []


def test_mlflow_client_logs_a_run_with_tracking_credentials(mlflow_url, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    client = MlflowClient(tracking_uri=mlflow_url)
    with pytest.raises(MlflowException):
        client.search_experiments(max_results=1)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    exp = client.create_experiment("herd-auth")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 1.5)
    client.log_text(run.info.run_id, "hello", "note.txt")  # through the proxied artifact store
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.metrics == {"loss": 1.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]


def test_prefect_client_uses_the_auth_string(prefect_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_url, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("herd-auth-check")
            assert client.read_flow(flow_id).name == "herd-auth-check"
