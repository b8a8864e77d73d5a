"""Shared fixtures: a shared package cache, and a Prefect test server with a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import setuptools  # noqa: F401  (see herd/__init__.py: before anything loads the stdlib distutils)

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Downloaded packages (PyPI/npm/Debian) are cached here once per machine and shared by all tests.
PACKAGE_CACHE = ROOT / ".herd" / "cache"


def pytest_configure(config):
    """The homes tests create claim their ports in a registry of the test session, not the user's
    (``~/.local/state/herd/homes.json``), so a later `make demo` still gets 4200/5000."""
    import tempfile

    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="herd-test-state-")


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
def smollm2(package_cache, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported the way a user does it, `herd models import`, once per session (its own
    process: the GGUF reader leaves this process's floating-point state such that fastText training later hits
    NaN)."""
    from stages.data.models import import_model

    home = tmp_path_factory.mktemp("models-home")
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    out = home / "smollm2-135m"
    env = {**os.environ, "HERD_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "herd.cli", "models", "import", "smollm2-135m", "--output", str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads(res.stdout)
    assert man["path"] == str(out) and 130e6 < man["params"] < 140e6 and man["license"] == "Apache-2.0"
    assert import_model("smollm2-135m", package_cache, out)["sha256"] == man["sha256"]  # converted once, reused
    return out


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
