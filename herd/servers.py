"""The embedded default: a Prefect server and an MLflow server on loopback, backed by SQLite, and the two
background services that make the Prefect UI usable: a worker for the local work pool and the inbox watcher.

``herd up`` starts the servers in the background, waits until they answer their health checks, registers the
deployments (:mod:`herd.deployments`), then starts the worker and the watcher; every process's pid is kept in
``$HERD_HOME/run`` and its log in ``$HERD_HOME/logs``. ``herd down`` stops them all. Flows started from the CLI
call :func:`ensure_up` first, which starts only the servers, so nothing relies on Prefect's per-process
ephemeral server.
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


@dataclass(frozen=True)
class Service:
    """A background process of ``herd up`` next to the servers (no URL: healthy while alive and beating)."""
    name: str
    argv: list[str]
    env: dict[str, str]
    what: str


WATCH_POLL_S = 5.0


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


def services(settings: Settings) -> list[Service]:
    """The worker for the local pool and the inbox watcher (only with herd's own Prefect server: against team
    servers, `herd deploy` and the team's workers do this)."""
    if settings.external_prefect:
        return []
    from herd.deployments import REPO_ROOT, deployment_specs, pools_of, prefect_bin, worker_env

    specs, _ = deployment_specs(REPO_ROOT / "infra" / "prefect.yaml")
    base = {"HERD_HOME": str(settings.home), "PREFECT_API_URL": settings.prefect_api_url,
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "PREFECT_HOME": str(settings.prefect_home)}
    out = [Service(name=f"worker-{pool}", what=f"Prefect worker for work pool {pool}",
                   argv=[prefect_bin(), "worker", "start", "--pool", pool, "--type", "process",
                         "--name", worker_name(settings, pool)],
                   env={**base, **worker_env()}) for pool in sorted(pools_of(specs))]
    out.append(Service(name="inbox-watcher", what=f"inbox watcher of {settings.preferences / 'inbox'}",
                       argv=[sys.executable, "-m", "herd.cli", "preferences", "watch", "--poll", f"{WATCH_POLL_S:g}",
                             "--beat", str(settings.run_dir / "inbox-watcher.beat")],
                       env=base))
    return out


def worker_name(settings: Settings, pool: str) -> str:
    return f"herd-{pool}-{settings.prefect_port}"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return settings.home / "logs" / f"{name}.log"


def _pid(settings: Settings, name: str) -> int | None:
    try:
        pid = int(_pid_file(settings, name).read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _spawn(settings: Settings, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    logp = _log_file(settings, name)
    logp.parent.mkdir(parents=True, exist_ok=True)
    with open(logp, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    _pid_file(settings, name).write_text(str(proc.pid))
    log.info("started %s (pid %d), log %s", name, proc.pid, logp)
    return proc


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _service_healthy(settings: Settings, svc: Service, pid: int | None) -> bool:
    if pid is None:
        return False
    if svc.name == "inbox-watcher":
        beat = settings.run_dir / "inbox-watcher.beat"
        return beat.is_file() and time.time() - beat.stat().st_mtime < max(30.0, 3 * WATCH_POLL_S)
    try:  # a worker is healthy when the server lists it online
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        pool = svc.argv[svc.argv.index("--pool") + 1]
        with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}), get_client(sync_client=True) as client:
            return any(w.name == worker_name(settings, pool) and str(getattr(w.status, "value", w.status)) == "ONLINE"
                       for w in client.read_workers_for_work_pool(pool))
    except Exception:  # noqa: BLE001  (no server, no pool: not healthy)
        return False


def status(settings: Settings) -> dict[str, dict]:
    """Each process herd runs for this home: its pid (None when not running), health, and URL or role."""
    result = {}
    for srv in servers(settings):
        result[srv.name] = {"url": srv.health_url.rsplit("/", 2)[0] if srv.name == "prefect" else srv.health_url[:-7],
                            "healthy": healthy(srv.health_url), "pid": _pid(settings, srv.name),
                            "log": str(_log_file(settings, srv.name))}
    for svc in services(settings):
        pid = _pid(settings, svc.name)
        result[svc.name] = {"what": svc.what, "healthy": _service_healthy(settings, svc, pid), "pid": pid,
                            "log": str(_log_file(settings, svc.name))}
    return result


def up(settings: Settings, timeout: float = 180.0, background: bool = False) -> dict[str, dict]:
    """Start whichever embedded servers are not answering yet; wait until all are healthy. With ``background``
    also register the deployments and start the worker and the inbox watcher (what `herd up` does)."""
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
                    f"HERD_HOME={settings.home} (no live pid in {pidf}); its state would land elsewhere: stop it "
                    f"(`herd down` with its HERD_HOME), use it via "
                    f"{'PREFECT_API_URL' if srv.name == 'prefect' else 'MLFLOW_TRACKING_URI'}, or unset "
                    f"{'HERD_PREFECT_PORT' if srv.name == 'prefect' else 'HERD_MLFLOW_PORT'} to let herd pick a port")
            continue
        if pidf.exists():
            pid = int(pidf.read_text())
            if _alive(pid):  # starting up from an earlier call: wait for it below
                started.append((srv, None))  # type: ignore[arg-type]
                continue
        started.append((srv, _spawn(settings, srv.name, srv.argv, srv.env, settings.home)))
    deadline = time.monotonic() + timeout
    for srv, proc in started:
        while not healthy(srv.health_url):
            if proc is not None and proc.poll() is not None:
                raise HerdError(f"the {srv.name} server exited with code {proc.returncode}; see its log "
                                f"{_log_file(settings, srv.name)}")
            if time.monotonic() > deadline:
                raise HerdError(f"the {srv.name} server did not answer {srv.health_url} within {timeout:.0f} s; "
                                f"see its log {_log_file(settings, srv.name)}")
            time.sleep(0.5)
    if background:
        start_services(settings)
    return status(settings)


def start_services(settings: Settings) -> dict:
    """Register the deployments (skipped while nothing changed), then start the worker and the inbox watcher
    unless they run. Returns what :func:`herd.deployments.register` did."""
    from herd.deployments import REPO_ROOT, register

    if settings.external_prefect:
        return {}
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        os.environ["PREFECT_API_URL"] = settings.prefect_api_url  # for the `prefect deploy` it runs
        reg = register(stamp=settings.run_dir / "deployments.sha256")
    for svc in services(settings):
        if _pid(settings, svc.name) is None:
            _spawn(settings, svc.name, svc.argv, svc.env, REPO_ROOT)
    return reg


def down(settings: Settings, timeout: float = 20.0) -> list[str]:
    """Stop the watcher, the worker (and the flow runs it started) and the servers; return the names stopped."""
    stopped = []
    for srv in [*services(settings)[::-1], *servers(settings)]:
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
