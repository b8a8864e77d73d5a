"""Where herd keeps its state, and which servers it talks to.

All state lives under ``$HERD_HOME`` (default ``./.herd``): the MLflow SQLite store and artifacts,
Prefect's home, package caches and content-addressed stage outputs. ``MLFLOW_TRACKING_URI`` and
``PREFECT_API_URL`` are respected when set, so the same flows run against team servers; otherwise
herd points both at the servers it starts itself on loopback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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


def load_settings() -> Settings:
    home = Path(os.environ.get("HERD_HOME", ".herd")).expanduser().resolve()
    prefect_port = int(os.environ.get("HERD_PREFECT_PORT", "4200"))
    mlflow_port = int(os.environ.get("HERD_MLFLOW_PORT", "5000"))
    prefect_api = os.environ.get("PREFECT_API_URL")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
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
