"""The embedded default: a Prefect server and an MLflow server on loopback, backed by SQLite.

``herd up`` starts both in the background, waits until they answer their health checks and records
their pids under ``$HERD_HOME/run``; ``herd down`` stops them. Flows started from the CLI call
:func:`ensure_up` first, so nothing relies on Prefect's per-process ephemeral server.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from herd.settings import Settings
from stages.errors import HerdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Server:
    name: str
    health_url: str
    argv: list[str]
    env: dict[str, str]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def servers(settings: Settings) -> list[Server]:
    out: list[Server] = []
    if not settings.external_prefect:
        db = settings.prefect_home / "prefect.db"
        out.append(Server(
            name="prefect",
            health_url=f"http://127.0.0.1:{settings.prefect_port}/api/health",
            argv=[_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect_port),
                  "--no-background", "--analytics-off"],
            env={
                "PREFECT_HOME": str(settings.prefect_home),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
                "PREFECT_API_URL": "",
                "PREFECT_UI_API_URL": f"http://127.0.0.1:{settings.prefect_port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            },
        ))
    if not settings.external_mlflow:
        mdir = settings.mlflow_dir
        out.append(Server(
            name="mlflow",
            health_url=f"http://127.0.0.1:{settings.mlflow_port}/health",
            argv=[_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(settings.mlflow_port),
                  "--backend-store-uri", f"sqlite:///{mdir / 'mlflow.db'}",
                  "--artifacts-destination", str(mdir / "artifacts"), "--serve-artifacts", "--workers", "1"],
            env={"MLFLOW_TRACKING_URI": ""},
        ))
    return out


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def status(settings: Settings) -> dict[str, dict]:
    result = {}
    for srv in servers(settings):
        pidf = _pid_file(settings, srv.name)
        pid = int(pidf.read_text()) if pidf.exists() else None
        result[srv.name] = {"url": srv.health_url.rsplit("/", 2)[0] if srv.name == "prefect" else srv.health_url[:-7],
                            "healthy": healthy(srv.health_url), "pid": pid if pid and _alive(pid) else None}
    return result


def up(settings: Settings, timeout: float = 180.0) -> dict[str, dict]:
    """Start whichever embedded servers are not answering yet; wait until all are healthy."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    (settings.mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    started: list[tuple[Server, subprocess.Popen]] = []
    for srv in servers(settings):
        pidf = _pid_file(settings, srv.name)
        if healthy(srv.health_url):
            if not (pidf.exists() and _alive(int(pidf.read_text()))):
                raise HerdError(
                    f"{srv.health_url} already answers, but herd did not start that {srv.name} server for "
                    f"HERD_HOME={settings.home} (no live pid in {pidf}); its state would land elsewhere. Stop it "
                    f"(`herd down` with its HERD_HOME), use it explicitly via "
                    f"{'PREFECT_API_URL' if srv.name == 'prefect' else 'MLFLOW_TRACKING_URI'}, or move herd's "
                    f"server with {'HERD_PREFECT_PORT' if srv.name == 'prefect' else 'HERD_MLFLOW_PORT'}")
            continue
        if pidf.exists():
            pid = int(pidf.read_text())
            if _alive(pid):  # starting up from an earlier call: wait for it below
                started.append((srv, None))  # type: ignore[arg-type]
                continue
        env = {**os.environ, **srv.env}
        env = {k: v for k, v in env.items() if v != ""}
        logf = open(settings.run_dir / f"{srv.name}.log", "ab")
        proc = subprocess.Popen(srv.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=settings.home, start_new_session=True)
        pidf.write_text(str(proc.pid))
        log.info("started %s server (pid %d), log %s", srv.name, proc.pid, logf.name)
        started.append((srv, proc))
    deadline = time.monotonic() + timeout
    for srv, proc in started:
        while not healthy(srv.health_url):
            if proc is not None and proc.poll() is not None:
                tail = (settings.run_dir / f"{srv.name}.log").read_text(errors="replace")[-2000:]
                raise HerdError(f"the {srv.name} server exited with code {proc.returncode}; "
                                f"log {settings.run_dir / (srv.name + '.log')}:\n{tail}")
            if time.monotonic() > deadline:
                raise HerdError(f"the {srv.name} server did not answer {srv.health_url} within {timeout:.0f} s; "
                                f"see {settings.run_dir / (srv.name + '.log')}")
            time.sleep(0.5)
    return status(settings)


def down(settings: Settings, timeout: float = 20.0) -> list[str]:
    stopped = []
    for srv in servers(settings):
        pidf = _pid_file(settings, srv.name)
        if not pidf.exists():
            continue
        pid = int(pidf.read_text())
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(srv.name)
        pidf.unlink(missing_ok=True)
    return stopped


def ensure_up(settings: Settings) -> None:
    up(settings)
