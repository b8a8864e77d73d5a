"""docker-compose.yml validates with the real Compose parser (no engine needed) and keeps its promises:
loopback ports, health checks, ordered start-up on health, authenticated servers, secrets only from .env."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests._compose import COMPOSE, COMPOSE_FILE, ENV_EXAMPLE, ROOT, SKIP_REASON, compose

pytestmark = pytest.mark.skipif(COMPOSE is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def config() -> dict:
    res = compose("config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_config_validates_with_the_example_env():
    res = compose("config", "-q")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_unknown_service_key_is_rejected(tmp_path):
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    doc["services"]["worker"]["restart_when"] = "always"  # not a Compose key
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = compose("config", "-q", file=bad)
    assert res.returncode != 0
    assert "restart_when" in res.stderr


@pytest.mark.parametrize("secret", ["POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD",
                                    "MLFLOW_FLASK_SERVER_SECRET_KEY", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"])
def test_missing_secret_fails_config(tmp_path, secret):
    lines = [ln for ln in ENV_EXAMPLE.read_text().splitlines() if not ln.startswith(f"{secret}=")]
    assert len(lines) < len(ENV_EXAMPLE.read_text().splitlines()), f"{secret} is not in .env.example"
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    res = compose("config", "-q", env_file=env_file)
    assert res.returncode != 0
    assert f"required variable {secret} is missing a value" in res.stderr


def test_env_example_names_every_variable_compose_reads():
    res = compose("config", "--variables", "--format", "json")
    assert res.returncode == 0, res.stderr
    used = set(json.loads(res.stdout))
    declared = {ln.split("=", 1)[0] for ln in ENV_EXAMPLE.read_text().splitlines() if ln and not ln.startswith("#")}
    assert used - declared == set()


def test_env_file_is_git_ignored():
    res = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert res.returncode != 128, "tests run from a git checkout (CI clones the repository)"
    assert res.returncode == 0, ".env must be listed in .gitignore"


def test_published_ports_bind_loopback(config):
    published = {(name, p["target"]): p.get("host_ip") for name, svc in config["services"].items()
                 for p in svc.get("ports", [])}
    assert {("prefect-server", 4200), ("mlflow", 5000)} <= set(published)
    assert all(ip == "127.0.0.1" for ip in published.values()), published


def test_servers_have_healthchecks(config):
    for name in ("postgres", "minio", "prefect-server", "mlflow"):
        check = config["services"][name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert "pg_isready" in " ".join(config["services"]["postgres"]["healthcheck"]["test"])


def test_dependencies_wait_for_health(config):
    seen = 0
    for name, svc in config["services"].items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            want = "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            assert spec["condition"] == want, f"{name} -> {dep}: {spec['condition']}"
            if want == "service_healthy":
                assert config["services"][dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"
            seen += 1
    assert seen >= 8
    assert set(config["services"]["worker"]["depends_on"]) >= {"prefect-server", "mlflow"}


def test_servers_require_credentials(config):
    svc = config["services"]
    mlflow_cmd = " ".join(svc["mlflow"]["command"])
    assert "--app-name basic-auth" in mlflow_cmd
    assert "MLFLOW_AUTH_CONFIG_PATH" in svc["mlflow"]["environment"]
    assert svc["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "change-me-mlflow-admin"
    prefect_env = svc["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_API_AUTH_STRING"] == "herd:change-me-prefect"
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker_env = svc["worker"]["environment"]
    assert worker_env["PREFECT_API_AUTH_STRING"] == prefect_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert worker_env["MLFLOW_TRACKING_PASSWORD"] == svc["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_worker_runs_the_herd_pool(config):
    worker = config["services"]["worker"]
    assert worker["command"] == ["prefect", "worker", "start", "--pool", "herd-local", "--type", "process"]
    assert worker["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert worker["environment"]["HERD_HOME"] == "/data"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in worker["volumes"])
    pool = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["definitions"]["work_pool"]["name"]
    assert pool == "herd-local"
