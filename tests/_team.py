"""docker-compose.yml's team stack without a Docker engine: its postgres, prefect-server and mlflow services run
as local processes, with the settings the Compose parser resolves from the file (every value the file sets;
secrets from a copy of .env.example with fresh random values), translated only where a container differs from a
process:

* host names: ``<service>:<container port>`` and the published ``127.0.0.1:<port>`` become ``127.0.0.1:<free
  port>`` (Postgres publishes nothing: ``postgres:5432`` -> its free port);
* paths: the container's ``/data``, ``/tmp/basic_auth.ini`` -> folders of a temporary directory;
* MinIO is not run: MLflow's ``--artifacts-destination s3://...`` becomes a local folder behind the same
  artifact proxy, and the S3 settings (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``) are dropped.

Postgres is Debian's server (``/usr/lib/postgresql/<v>/bin``), initialised the way the postgres image's
entrypoint does it (superuser and password from POSTGRES_USER/POSTGRES_PASSWORD, POSTGRES_DB created, the
``/docker-entrypoint-initdb.d`` SQL files the file mounts run with psql), on a free loopback port. Postgres refuses
to run as root: under root it runs as ``nobody``, in a private folder under /tmp that user owns.

:func:`team_stack` starts everything and stops every process (Postgres included) on exit, also on failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests._compose import COMPOSE_FILE, ENV_EXAMPLE, compose_config

VENV_BIN = str(Path(sys.executable).parent)
INITDB_DIR = "/docker-entrypoint-initdb.d/"
S3_KEYS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def postgres_bin_dir() -> Path | None:
    """Debian's PostgreSQL server binaries (the newest installed major version), else those on PATH."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if all(Path(d, b).is_file() for b in ("initdb", "postgres", "pg_isready", "psql")):
            return Path(d)
    found = [shutil.which(b) for b in ("initdb", "postgres", "pg_isready", "psql")]
    return Path(found[0]).parent if all(found) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, *, auth: tuple[str, str] | None = None, body: bytes | None = None) -> int:
    """The status of a GET (or a POST of a JSON ``body``), with HTTP basic ``auth`` if given."""
    import base64

    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


# ------------------------------------------------------------------ the compose file, resolved


def secret_env_file(folder: Path) -> Path:
    """.env.example with every placeholder secret (``change-me...``) replaced by a fresh random value."""
    text = re.sub(r"change-me[\w.-]*", lambda _: secrets.token_urlsafe(18), ENV_EXAMPLE.read_text())
    assert "change-me" not in text
    out = folder / ".env"
    out.write_text(text)
    out.chmod(0o600)
    return out


def substitute(value: str, hosts: dict[str, str]) -> str:
    """Each ``host:port`` of ``hosts`` in ``value`` replaced, in one pass (a replacement is not matched again),
    whole addresses only (``127.0.0.1:4200`` is not a prefix of ``127.0.0.1:42001``)."""
    pattern = r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(hosts, key=len, reverse=True))) + r")(?!\d)"
    return re.sub(pattern, lambda m: hosts[m.group(1)], value)


def one_sub(pattern: str, repl: str, text: str, what: str) -> str:
    """``re.sub`` that must match exactly once: a changed compose file fails here, naming what moved."""
    out, n = re.subn(pattern, repl, text)
    assert n == 1, f"docker-compose.yml: expected one {what} ({pattern!r}), found {n} in:\n{text}"
    return out


def health_url(service: dict) -> str:
    """The URL a service's compose healthcheck opens."""
    urls = re.findall(r"https?://[^'\"\s)]+", " ".join(service["healthcheck"]["test"]))
    assert len(urls) == 1, service["healthcheck"]
    return urls[0]


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the process group (servers' workers included), wait, SIGKILL what is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group (e.g. uvicorn workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def stop_all(procs: dict[str, Proc]) -> None:
    """Stop in reverse start order (the servers before Postgres), every one even if stopping another fails.
    Postgres gets SIGINT (its fast shutdown); the servers SIGTERM."""
    errors = []
    for name, proc in reversed(list(procs.items())):
        try:
            proc.stop(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: {exc!r}")
    assert not errors, errors


def start(name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path, **kw) -> Proc:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    return Proc(name, popen, log)


def wait_for(proc: Proc, ready, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: not {what} after {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(0.5)


def url_ok(url: str) -> bool:
    try:
        return http(url) == 200
    except OSError:
        return False


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect/MLflow/HERD settings (a developer's must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HERD_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    return {**env, **extra}


# ------------------------------------------------------------------ the stack


@dataclass
class TeamStack:
    root: Path
    config: dict                      # docker-compose.yml, resolved with the test's secrets
    hosts: dict[str, str]             # compose address -> local address
    prefect_api_url: str
    mlflow_url: str
    prefect_auth: str                 # user:password
    mlflow_admin: tuple[str, str]
    artifacts: Path                   # where the MLflow artifact proxy stores files
    client_env: dict[str, str]        # the worker's environment (x-herd-client-env), translated
    postgres: dict[str, str]          # user, password, db (POSTGRES_DB), port
    procs: dict[str, Proc] = field(default_factory=dict)

    def postgres_dsn(self, db: str) -> str:
        pg = self.postgres
        return f"postgresql://{pg['user']}:{pg['password']}@127.0.0.1:{pg['port']}/{db}"


def _postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run Postgres as when we are root (it refuses root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _as(ids: tuple[int, int] | None) -> dict:
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def start_postgres(svc: dict, pg_bin: Path, port: int, logs: Path, procs: dict[str, Proc],
                   cleanup: contextlib.ExitStack) -> dict[str, str]:
    """Initialise and start Postgres as the postgres image would for ``svc``; return its POSTGRES_* settings."""
    env = svc["environment"]
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env.get("POSTGRES_DB", env["POSTGRES_USER"])
    ids = _postgres_user()
    # /tmp, not pytest's tmp_path: a folder under /tmp/pytest-of-root (0700) is out of reach of `nobody`
    top = Path(tempfile.mkdtemp(prefix="herd-team-pg-", dir="/tmp" if ids else None))
    cleanup.callback(shutil.rmtree, top, ignore_errors=True)
    data = top / "data"
    data.mkdir(mode=0o700)
    pwfile = top / "pw"
    pwfile.write_text(password + "\n")
    if ids:
        for p in (top, data, pwfile):
            os.chown(p, *ids)
    pg_env = {"PATH": f"{pg_bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(top)}
    # the postgres image: initdb --username=$POSTGRES_USER --pwfile=<(echo "$POSTGRES_PASSWORD"),
    # `host all all all scram-sha-256` (POSTGRES_HOST_AUTH_METHOD's default once a password is set)
    res = subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "--username", user, "--pwfile", str(pwfile),
                          "--auth-local", "trust", "--auth-host", "scram-sha-256", "--encoding", "UTF8",
                          "--locale", "C.UTF-8", "--no-sync"],
                         env=pg_env, cwd=top, capture_output=True, text=True, timeout=120, **_as(ids))
    assert res.returncode == 0, f"initdb failed:\n{res.stdout}\n{res.stderr}"
    pwfile.unlink()
    proc = start("postgres", [str(pg_bin / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                              "-k", str(top), "-c", "fsync=off", "-c", "synchronous_commit=off"],
                 pg_env, logs, top, **_as(ids))
    procs["postgres"] = proc

    def isready() -> bool:  # the compose healthcheck: pg_isready -U herd -d prefect (here: the server answers)
        return subprocess.run([str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "-q"],
                              env=pg_env, timeout=10).returncode == 0

    wait_for(proc, isready, "accepting connections", 60)
    psql = [str(pg_bin / "psql"), "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", user,
            "--no-password", "-q"]
    client_env = {**pg_env, "PGPASSWORD": password}  # over TCP: the password is checked (scram-sha-256)
    res = subprocess.run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{db}"'], env=client_env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    inits = sorted((v for v in svc.get("volumes", []) if v["target"].startswith(INITDB_DIR)),
                   key=lambda v: v["target"])
    assert inits, "docker-compose.yml: postgres mounts no init script into " + INITDB_DIR
    for vol in inits:
        assert vol["target"].endswith(".sql"), f"only .sql init scripts are run here: {vol['target']}"
        res = subprocess.run([*psql, "-d", db, "-f", vol["source"]], env=client_env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, f"{vol['source']}: {res.stderr}"
    return {"user": user, "password": password, "db": db, "port": str(port)}


@contextlib.contextmanager
def team_stack(root: Path, pg_bin: Path, timeout: float = 180.0,
               compose_file: Path = COMPOSE_FILE) -> Iterator[TeamStack]:
    """docker-compose.yml's postgres, prefect-server and mlflow (see the module's docstring), healthy."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = compose_config(env_file=secret_env_file(root), file=compose_file)
    svc = config["services"]
    pg_port, prefect_port, mlflow_port = free_port(), free_port(), free_port()
    local = {"prefect-server": prefect_port, "mlflow": mlflow_port}
    hosts = {"postgres:5432": f"127.0.0.1:{pg_port}"}
    for name, port in local.items():
        assert len(svc[name]["ports"]) == 1, svc[name]["ports"]
        p = svc[name]["ports"][0]
        hosts[f"{name}:{p['target']}"] = f"127.0.0.1:{port}"
        hosts[f"{p['host_ip']}:{p['published']}"] = f"127.0.0.1:{port}"
        hosts[f"localhost:{p['published']}"] = f"localhost:{port}"

    procs: dict[str, Proc] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_all, procs)
        pg = start_postgres(svc["postgres"], pg_bin, pg_port, logs, procs, cleanup)

        # prefect-server: its command and environment, translated
        ps = svc["prefect-server"]
        p_env = {k: substitute(str(v), hosts) for k, v in ps["environment"].items()}
        assert "postgres" not in p_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].split("@", 1)[1]
        p_cmd = " ".join(ps["command"])
        p_cmd = one_sub(r"--host \S+", "--host 127.0.0.1", p_cmd, "prefect --host")
        p_cmd = one_sub(r"--port \d+", f"--port {prefect_port}", p_cmd, "prefect --port")
        procs["prefect"] = start("prefect", p_cmd.split(), base_env(PREFECT_HOME=str(root / "prefect-home"), **p_env),
                                 logs, root)

        # mlflow: its shell script (writes basic_auth.ini, execs `mlflow server`), translated
        ms = svc["mlflow"]
        assert ms["command"][:2] == ["/bin/sh", "-ec"], ms["command"]
        script = ms["command"][2].replace("$$", "$")
        script = substitute(script, hosts)
        assert "postgres:" not in script, script
        artifacts = root / "mlflow-artifacts"
        artifacts.mkdir()
        script = one_sub(r'--artifacts-destination "s3://[^"]+"', f'--artifacts-destination "{artifacts}"', script,
                         "S3 artifact destination (served through MLflow's proxy)")
        script = one_sub(r"--host \S+", "--host 127.0.0.1", script, "mlflow --host")
        script = one_sub(r"--port \d+", f"--port {mlflow_port}", script, "mlflow --port")
        m_env = {k: substitute(str(v), hosts) for k, v in ms["environment"].items() if k not in S3_KEYS}
        m_env["MLFLOW_AUTH_CONFIG_PATH"] = str(root / "mlflow-auth" / Path(m_env["MLFLOW_AUTH_CONFIG_PATH"]).name)
        (root / "mlflow-auth").mkdir()
        procs["mlflow"] = start("mlflow", ["/bin/sh", "-ec", script], base_env(**m_env), logs, root)

        # the worker's environment (x-herd-client-env): what herd's CLI, workers and flow runs get
        client = {k: substitute(str(v), hosts) for k, v in svc["worker"]["environment"].items()
                  if k not in S3_KEYS}
        client["HERD_HOME"] = str(root / "herd-home")
        left = [f"{k}={v}" for k, v in client.items() if re.search(r"//(postgres|prefect-server|mlflow|minio)\b", v)]
        assert not left, f"compose service names left in the client environment: {left}"

        stack = TeamStack(
            root=root, config=config, hosts=hosts, prefect_api_url=client["PREFECT_API_URL"],
            mlflow_url=client["MLFLOW_TRACKING_URI"], prefect_auth=client["PREFECT_API_AUTH_STRING"],
            mlflow_admin=(m_env["MLFLOW_AUTH_ADMIN_USERNAME"], m_env["MLFLOW_AUTH_ADMIN_PASSWORD"]),
            artifacts=artifacts, client_env=client, postgres=pg, procs=procs)
        # both health checks as compose runs them (the same URLs, translated)
        for name, proc in (("prefect-server", procs["prefect"]), ("mlflow", procs["mlflow"])):
            url = substitute(health_url(svc[name]), hosts)
            wait_for(proc, lambda u=url: url_ok(u), f"healthy ({url})", timeout)
        yield stack
