"""Team mode, run for real: docker-compose.yml's servers without a Docker engine (tests/_team.py). A real
PostgreSQL server backs Prefect (``prefect server start`` with the file's PREFECT_SERVER_DATABASE_CONNECTION_URL
and PREFECT_SERVER_API_AUTH_STRING) and MLflow (the file's own start script: basic_auth.ini, the basic-auth app,
the Postgres tracking and user stores, the artifact proxy; a local folder stands in for MinIO). Every setting
comes from the Compose parser's view of the file, so a change that breaks team mode breaks this test.

Against them, as a user of the compose stack runs it (the worker's environment: PREFECT_API_URL +
PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_URI + MLFLOW_TRACKING_USERNAME/PASSWORD): ``herd demo --preset smoke``
(one alignment round) and then ``herd round``. Then the authenticated clients find the runs, the registered
models and their artifacts (through the proxy), and the completed flow runs, while clients without
credentials are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests._compose import COMPOSE, SKIP_REASON
from tests._team import base_env, http, postgres_bin_dir, team_stack

ROOT = Path(__file__).resolve().parents[1]
HERD = [sys.executable, "-m", "herd.cli"]
PG_BIN = postgres_bin_dir()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(COMPOSE is None, reason=SKIP_REASON),
    pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries (initdb, postgres, pg_isready, psql) not "
                       "found: install Debian's `postgresql` package"),
]

# The smoke preset as a user would run it on the team stack, with two overrides: its corpus has no Q&A source, so
# the mix renormalises the others (with `missing_sources: error`, the preset's setting until stages/presets.py says
# otherwise, `herd demo --preset smoke` stops at the mix), and the demo runs one alignment round; `herd round` then
# runs the second. (Fewer sweep budgets would not save time: the fit
# then recommends a smaller model trained on more tokens, and pretraining takes longer than the runs saved.)
OVERRIDES = """\
mix:
  missing_sources: renormalise
alignment:
  rounds: 1
"""
EXPERIMENTS_SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    with team_stack(tmp_path_factory.mktemp("team"), PG_BIN) as stack:
        yield stack


@pytest.fixture(scope="module")
def cli(team, package_cache, tmp_path_factory):
    """`herd demo --preset smoke` then `herd round`, in subprocesses with the worker's environment."""
    home = Path(team.client_env["HERD_HOME"])
    home.mkdir(parents=True)
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    overrides = tmp_path_factory.mktemp("team-config") / "team.yaml"
    overrides.write_text(OVERRIDES)
    env = base_env(**team.client_env)

    def herd(*args: str, timeout: float) -> subprocess.CompletedProcess:
        res = subprocess.run([*HERD, *args, "--preset", "smoke", "--config", str(overrides)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout)
        (team.root / "logs" / f"herd-{args[0]}.stderr").write_text(res.stderr)  # kept with the servers' logs
        assert res.returncode == 0, f"herd {args[0]}: exit {res.returncode}\n{res.stderr[-6000:]}"
        return res

    demo = herd("demo", timeout=600)
    latest = json.loads((home / "reports" / "latest.json").read_text())
    rnd = json.loads(herd("round", timeout=300).stdout)
    return {"home": home, "demo": demo.stdout, "report_run": latest["run_id"], "round": rnd}


@pytest.fixture
def mlflow_client(team, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.mlflow_admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.mlflow_admin[1])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.mlflow_url)
    return MlflowClient(tracking_uri=team.mlflow_url)


def prefect_client(team, auth: bool = True):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    if auth:
        ctx = temporary_settings({PREFECT_API_URL: team.prefect_api_url, PREFECT_API_AUTH_STRING: team.prefect_auth})
    else:
        ctx = temporary_settings({PREFECT_API_URL: team.prefect_api_url}, restore_defaults={PREFECT_API_AUTH_STRING})
    return ctx, get_client


def test_servers_refuse_clients_without_credentials(team, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    admin = team.mlflow_admin
    assert http(team.mlflow_url + EXPERIMENTS_SEARCH) == 401
    assert http(team.mlflow_url + EXPERIMENTS_SEARCH, auth=(admin[0], admin[1] + "x")) == 401
    assert http(team.mlflow_url + EXPERIMENTS_SEARCH, auth=admin) == 200
    user, password = team.prefect_auth.split(":", 1)
    assert http(team.prefect_api_url + "/flows/filter", body=b"{}") == 401
    assert http(team.prefect_api_url + "/flows/filter", body=b"{}", auth=(user, password + "x")) == 401
    assert http(team.prefect_api_url + "/flows/filter", body=b"{}", auth=(user, password)) == 200
    # the health checks compose relies on stay open
    assert http(team.mlflow_url + "/health") == 200 and http(team.prefect_api_url + "/health") == 200

    # the clients herd uses, without credentials
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(tracking_uri=team.mlflow_url).search_experiments(max_results=1)
    ctx, get_client = prefect_client(team, auth=False)
    with ctx, pytest.raises(Exception) as err:
        with get_client(sync_client=True) as client:
            client.read_flows(limit=1)
    assert "401" in str(err.value), err.value

    # herd itself, given the servers' URLs but no credentials: refused before any flow run exists
    anonymous = {k: v for k, v in team.client_env.items()
                 if k not in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    anonymous["HERD_HOME"] = str(tmp_path)
    res = subprocess.run([*HERD, "round", "--preset", "smoke"], env=base_env(**anonymous), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert "401 Unauthorized" in line and ("PREFECT_API_AUTH_STRING" in line or "MLFLOW_TRACKING_PASSWORD" in line)


def test_smoke_pipeline_and_a_round_ran_against_the_team_servers(cli, team):
    assert "# herd report card" in cli["demo"] and "| rlhf-v1 |" in cli["demo"]
    assert f"MLflow UI: {team.mlflow_url}" in cli["demo"]
    rnd = cli["round"]
    assert rnd["round"] == 2 and rnd["algorithms"] == ["rejection_sampling", "ppo"]
    assert rnd["registered"]["name"] == "policy" and rnd["registered"]["alias"] == "rlhf-v2"
    assert rnd["registered"]["version"] == 2


def test_mlflow_holds_runs_models_and_proxied_artifacts(cli, team, mlflow_client, tmp_path):
    import mlflow

    client = mlflow_client
    exp = client.get_experiment_by_name("herd")
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location  # the proxy, not a path
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    flows = Counter(r.data.tags.get("herd.flow") for r in runs)
    assert flows["herd-pipeline"] == 1 and flows["alignment-round"] == 1, flows  # the demo's round is nested

    # the report card: logged through the proxy, stored in its destination folder, readable back
    run = client.get_run(cli["report_run"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    local = json.loads((cli["home"] / "reports" / cli["report_run"] / "report.json").read_text())
    # tracking_uri named: another module may have set mlflow's process-wide URI, which wins over the environment
    got = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run.info.run_id}/report.json",
                                              dst_path=str(tmp_path), tracking_uri=team.mlflow_url)
    assert json.loads(Path(got).read_text()) == local
    stored = team.artifacts / run.info.artifact_uri.removeprefix("mlflow-artifacts:/") / "report.json"
    assert json.loads(stored.read_text()) == local
    proxied = f"{team.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/" + \
        run.info.artifact_uri.removeprefix("mlflow-artifacts:/") + "/report.json"
    assert http(proxied) == 401 and http(proxied, auth=team.mlflow_admin) == 200

    # the registered models, each version's files behind the proxy
    policy = client.get_registered_model("policy")
    assert {a: int(v) for a, v in policy.aliases.items()}.items() >= {"rlhf-v1": 1, "rlhf-v2": 2}.items()
    assert "champion" in policy.aliases
    for name in ("policy", "rm-helpfulness", "rm-safety"):
        versions = client.search_model_versions(f"name='{name}'")
        assert len(versions) >= 2, name
        newest = max(versions, key=lambda v: int(v.version))
        where = client.get_model_version_download_uri(name, newest.version)
        assert where.startswith("mlflow-artifacts:/"), (name, where)
        files = {Path(a.path).name
                 for a in mlflow.artifacts.list_artifacts(artifact_uri=where, tracking_uri=team.mlflow_url)}
        assert "MLmodel" in files, (name, files)
        assert (team.artifacts / where.removeprefix("mlflow-artifacts:/") / "MLmodel").is_file()


def test_prefect_flow_runs_completed(cli, team, mlflow_client):
    ctx, get_client = prefect_client(team)
    with ctx, get_client(sync_client=True) as client:
        names = {f.id: f.name for f in client.read_flows(limit=200)}
        runs = client.read_flow_runs(limit=200)
        artifacts = client.read_artifacts(limit=200)
    states = Counter((names[r.flow_id], r.state_type.value) for r in runs)
    assert all(state == "COMPLETED" for _, state in states), states
    by_flow = Counter(names[r.flow_id] for r in runs)
    assert by_flow["herd-pipeline"] == 1 and by_flow["alignment-round"] == 2, by_flow
    assert {"data-fetch", "curation", "mix", "tokenizer", "pretrain", "sft", "preference-collect",
            "reward-models"} <= set(by_flow), by_flow
    assert artifacts, "no Prefect artifacts (the report card is one)"

    # MLflow's pipeline run names the Prefect flow run it belongs to
    pipeline = next(r for r in runs if names[r.flow_id] == "herd-pipeline")
    tags = mlflow_client.get_run(cli["report_run"]).data.tags
    assert tags["prefect.flow_run_id"] == str(pipeline.id)


def test_state_lives_in_postgres(cli, team):
    """Both servers' stores are the Postgres databases the compose file names (not a SQLite fallback)."""
    import psycopg2

    def one(db: str, sql: str):
        with psycopg2.connect(team.postgres_dsn(db)) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]

    assert one("prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'") >= 10
    assert one("mlflow", "SELECT count(*) FROM registered_models WHERE name IN "
                         "('policy', 'rm-helpfulness', 'rm-safety')") == 3
    assert one("mlflow_auth", "SELECT count(*) FROM users WHERE is_admin") >= 1
