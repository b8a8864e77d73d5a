"""Shared fixtures: a shared package cache, and a Prefect test server with a real MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import setuptools  # noqa: F401  (see herd/__init__.py: before anything loads the stdlib distutils)

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Downloaded packages (PyPI/npm/Debian) are cached here once per machine and shared by all tests.
PACKAGE_CACHE = ROOT / ".herd" / "cache"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def package_cache() -> Path:
    PACKAGE_CACHE.mkdir(parents=True, exist_ok=True)
    return PACKAGE_CACHE


@pytest.fixture(scope="session")
def herd_home(tmp_path_factory, package_cache) -> Path:
    """A fresh $HERD_HOME whose package cache is the shared one."""
    home = tmp_path_factory.mktemp("herd-home")
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    return home


@pytest.fixture(scope="session")
def prefect_mlflow(herd_home):
    """A real Prefect server (the test harness) and a real MLflow SQLite store for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    old = {k: os.environ.get(k) for k in ("HERD_HOME", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE")}
    os.environ["HERD_HOME"] = str(herd_home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{herd_home / 'mlflow.db'}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # artifacts next to the store, not in ./mlruns of the working directory
    mlflow.create_experiment("herd", artifact_location=(herd_home / "mlartifacts").as_uri())
    with prefect_test_harness(server_startup_timeout=120):
        yield herd_home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
