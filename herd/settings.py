"""Where herd keeps its state, and which servers it talks to.

All state lives under ``$HERD_HOME`` (default ``./.herd``): the MLflow SQLite store and artifacts,
Prefect's home, package caches and content-addressed stage outputs. ``MLFLOW_TRACKING_URI`` and
``PREFECT_API_URL`` are respected when set, so the same flows run against team servers; otherwise
herd points both at the servers it starts itself on loopback.

Each home has its own loopback ports, picked on first use and kept in ``$HERD_HOME/run/ports.json``: 4200
(Prefect) and 5000 (MLflow) when free, else free ports the system hands out, so several homes run side by side.
A recorded port that another program has taken meanwhile (while this home's server is down) is picked anew.
Which home holds which ports is also kept machine-wide (``$XDG_STATE_HOME/herd/homes.json``), so a new home never
takes the ports of one whose servers are down.
``HERD_PREFECT_PORT`` / ``HERD_MLFLOW_PORT`` override.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}


@dataclass(frozen=True)
class Settings:
    home: Path
    prefect_port: int
    mlflow_port: int
    prefect_api_url: str
    mlflow_tracking_uri: str
    external_prefect: bool
    external_mlflow: bool

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def preferences(self) -> Path:
        """Preference batches (``batches/``), quarantine, and the default annotation ``inbox/``."""
        return self.home / "preferences"

    @property
    def mlflow_ui_url(self) -> str:
        return self.mlflow_tracking_uri if self.mlflow_tracking_uri.startswith("http") else ""


def _bindable(port: int) -> bool:
    """Whether a server could listen on loopback ``port`` now (as uvicorn binds: SO_REUSEADDR, so a port in
    TIME_WAIT after our own server stopped counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_alive(home: Path, name: str) -> bool:
    """Whether the server herd started for ``home`` (``run/<name>.pid``) is still running."""
    try:
        pid = int((home / "run" / f"{name}.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _registry_path() -> Path:
    """The machine-wide record of which home holds which ports (one per user), so a home whose servers are down
    keeps its ports: ``$XDG_STATE_HOME/herd/homes.json`` (default ``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "herd" / "homes.json"


@contextmanager
def _registry() -> Iterator[dict[str, dict[str, int]]]:
    """The registry under an exclusive lock; homes whose folder is gone are dropped; written back atomically."""
    path = _registry_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError:  # read-only home directory: no registry, ports are still checked by binding
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            homes = json.loads(path.read_text())
            homes = {h: {k: int(v) for k, v in p.items()} for h, p in homes.items() if isinstance(p, dict)}
        except (OSError, ValueError, AttributeError):
            homes = {}
        homes = {h: p for h, p in homes.items() if (Path(h) / "run" / "ports.json").exists()}
        before = json.dumps(homes, sort_keys=True)
        yield homes
        if json.dumps(homes, sort_keys=True) != before:
            tmp = path.with_name(f".homes.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(homes, indent=1, sort_keys=True))
            os.replace(tmp, path)


def home_ports(home: Path) -> dict[str, int]:
    """This home's loopback ports (``run/ports.json``), picked on first use: the default when free, else any free
    port. Ports recorded by another home on this machine are never picked, even while its servers are down. A
    recorded port held by another program while this home's server is down is picked anew."""
    path = home / "run" / "ports.json"
    try:
        ports = {k: int(v) for k, v in json.loads(path.read_text()).items() if k in DEFAULT_PORTS}
    except (OSError, ValueError, AttributeError):
        ports = {}
    with _registry() as homes:
        others = {p for h, claimed in homes.items() if h != str(home) for p in claimed.values()}
        changed = False
        for name, default in DEFAULT_PORTS.items():
            port = ports.get(name)
            if port is not None and (_server_alive(home, name) or (port not in others and _bindable(port))):
                continue
            taken = others | {p for k, p in ports.items() if k != name}
            port = default if default not in taken and _bindable(default) else _free_port()
            while port in taken:
                port = _free_port()
            ports[name], changed = port, True
        if changed or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".ports.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ports))
            os.replace(tmp, path)
        homes[str(home)] = dict(ports)
    return ports


def load_settings() -> Settings:
    home = Path(os.environ.get("HERD_HOME", ".herd")).expanduser().resolve()
    prefect_api = os.environ.get("PREFECT_API_URL")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    env_prefect, env_mlflow = os.environ.get("HERD_PREFECT_PORT"), os.environ.get("HERD_MLFLOW_PORT")
    ports = home_ports(home) if not ((env_prefect or prefect_api) and (env_mlflow or mlflow_uri)) else {}
    prefect_port = int(env_prefect) if env_prefect else ports.get("prefect", DEFAULT_PORTS["prefect"])
    mlflow_port = int(env_mlflow) if env_mlflow else ports.get("mlflow", DEFAULT_PORTS["mlflow"])
    return Settings(
        home=home,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        prefect_api_url=prefect_api or f"http://127.0.0.1:{prefect_port}/api",
        mlflow_tracking_uri=mlflow_uri or f"http://127.0.0.1:{mlflow_port}",
        external_prefect=bool(prefect_api),
        external_mlflow=bool(mlflow_uri),
    )


def apply_environment(settings: Settings) -> None:
    """Point this process (and the children it starts) at herd's servers and state folders."""
    settings.home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # libraries' own progress bars (weights loading, artifact downloads) would fill the log files with \r lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
