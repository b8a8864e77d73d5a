"""Browser tests against the servers `herd up` starts: fixtures for the stack, Chromium and screenshots.

The stack is the real thing, in its own temporary HERD_HOME on free ports: `herd up` alone (it registers the
deployments and runs a process worker for the `herd-local` pool and the inbox watcher), and the SFT model + two preference batches + reward models an
alignment round needs (tests/ui/_prepare.py, in the background while the first browser test runs).
`herd down` at the end. Screenshots go to $HERD_UI_ARTIFACTS (default .herd/ui-artifacts, git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERD = [sys.executable, "-m", "herd.cli"]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "herd-local"
PREPARE_TIMEOUT_S = 480  # SFT + 2 batches + 4 RM trainings: ~2 min on 2 idle cores
# what herd.settings.apply_environment sets for the flows the CLI runs; the worker and _prepare run them too
FLOW_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "GIT_PYTHON_REFRESH": "quiet"}


def chromium_executable() -> str | None:
    """$HERD_CHROMIUM, else the system Chromium (Debian's `chromium` package) or Chrome on PATH."""
    for name in (os.environ.get("HERD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and (path := shutil.which(name)):
            return path
    return None


def artifacts_dir() -> Path:
    return Path(os.environ.get("HERD_UI_ARTIFACTS") or ROOT / ".herd" / "ui-artifacts").resolve()


# ------------------------------------------------------------------ screenshots


class Shots:
    """Full-page screenshots under one folder, in the order taken; names say the step."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.taken: list[Path] = []

    def __call__(self, page, name: str, full_page: bool = True) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        self.taken.append(path)
        return path


_SHOTS: list[Shots] = []


@pytest.fixture(scope="session")
def shots() -> Shots:
    folder = artifacts_dir()
    folder.mkdir(parents=True, exist_ok=True)
    s = Shots(folder)
    _SHOTS.append(s)
    return s


def pytest_terminal_summary(terminalreporter):
    for s in _SHOTS:
        if s.taken:
            terminalreporter.write_line(f"ui screenshots ({len(s.taken)}): {s.folder}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


# ------------------------------------------------------------------ the browser


@pytest.fixture(scope="session")
def browser():
    exe = chromium_executable()
    if exe is None:
        why = ("no Chromium: install it (`apt-get install chromium`; `make venv` does so on Debian as root) "
               "or set HERD_CHROMIUM to a Chrome/Chromium binary")
        if shutil.which("apt-get") and os.geteuid() == 0:
            pytest.fail(why + "; `make venv` should have installed it here")  # where it can, a missing one is a bug
        pytest.skip(why)
    from playwright import sync_api  # a test dependency (pyproject's `test` extra)

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


def new_page(browser):
    # UTC and en-US: the UIs render times and schedules in the browser's zone and locale
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, timezone_id="UTC", locale="en-US")
    ctx.set_default_timeout(30_000)
    return ctx, ctx.new_page()


@pytest.fixture
def page(browser, shots, request):
    """A fresh browser page per test; a screenshot named FAILED-<test> when the test fails."""
    ctx, pg = new_page(browser)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        try:
            shots(pg, f"FAILED-{request.node.name}")
        except Exception:  # noqa: BLE001  (the page may be gone; the test's own error matters)
            pass
    ctx.close()


# ------------------------------------------------------------------ the herd stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30.0, tries: int = 6):
    """GET (or POST ``body``) and parse the JSON answer. A 503 (the SQLite-backed server busy, as under the whole
    suite's load) is retried with backoff, as Prefect's own client does."""
    for attempt in range(tries):
        req = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)


def log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"(no {path})"


@dataclass
class Stack:
    home: Path
    prefect_url: str  # the UI; the API is prefect_url + "/api"
    mlflow_url: str
    env: dict[str, str]  # what a client of these servers runs with
    prepare: subprocess.Popen
    prepare_dir: Path
    prepare_log: Path
    worker: None  # `herd up` runs it (pid in $HERD_HOME/run)
    worker_log: Path
    prepared: dict = field(default_factory=dict)

    def prefect_api(self, path: str, body: dict | None = None):
        return http_json(f"{self.prefect_url}/api{path}", body)

    def mlflow_api(self, path: str, **query):
        return http_json(f"{self.mlflow_url}/api/2.0/mlflow{path}?{urllib.parse.urlencode(query)}")

    def wait_prepared(self, timeout: float = PREPARE_TIMEOUT_S) -> dict:
        """Block until _prepare has made the SFT model, both batches and the RMs; its result."""
        if not self.prepared:
            try:
                rc = self.prepare.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"preparing the SFT model and preference batches took over {timeout:.0f} s; log "
                            f"{self.prepare_log}:\n{log_tail(self.prepare_log)}")
            assert rc == 0, f"tests/ui/_prepare.py exited {rc}; log {self.prepare_log}:\n{log_tail(self.prepare_log)}"
            self.prepared = json.loads((self.prepare_dir / "prepared.json").read_text())
        return self.prepared


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started in its own session, and whatever it started (flow runs of the worker)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def herd_stack(tmp_path_factory, package_cache, browser) -> Stack:
    """`herd up` on free ports in a fresh HERD_HOME (deployments registered, a worker, the watcher), the round's
    inputs.
    (Asks for ``browser`` first so that a machine without Chromium skips before any server starts.)"""
    home = tmp_path_factory.mktemp("ui-herd-home")
    (home / "cache").symlink_to(package_cache, target_is_directory=True)  # package downloads: shared
    prefect_port, mlflow_port = free_port(), free_port()
    while mlflow_port == prefect_port:
        mlflow_port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HERD_"))}
    server_env = {**base, "HERD_HOME": str(home), "HERD_PREFECT_PORT": str(prefect_port),
                  "HERD_MLFLOW_PORT": str(mlflow_port)}
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {**server_env, **FLOW_ENV, "PREFECT_API_URL": f"{prefect_url}/api", "MLFLOW_TRACKING_URI": mlflow_url,
           "PREFECT_HOME": str(home / "prefect")}
    logs = home / "ui-logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def run(args: list[str], what: str, e: dict, timeout: float) -> str:
        res = subprocess.run(args, env=e, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"`{what}` exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout

    def spawn(args: list[str], log: Path, e: dict) -> subprocess.Popen:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(args, env=e, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)
        return proc

    try:
        # _prepare builds its base model while the servers start, then waits for them
        go = home / "ui-prepare.go"
        prep_dir = home / "ui-prepare"
        prep_log = logs / "prepare.log"
        prepare = spawn([sys.executable, "-m", "tests.ui._prepare", str(prep_dir), str(go)], prep_log, env)
        # `herd up` alone (no `herd deploy`): servers, deployments, a worker for herd-local and the inbox watcher
        try:
            run([*HERD, "up", "--timeout", "240"], "herd up", {**server_env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, 300)
        finally:
            go.touch()
        worker_log = home / "logs" / "worker-herd-local.log"
        worker = None
        yield Stack(home=home, prefect_url=prefect_url, mlflow_url=mlflow_url, env=env, prepare=prepare,
                    prepare_dir=prep_dir, prepare_log=prep_log, worker=worker, worker_log=worker_log)
    finally:
        for proc in reversed(started):
            _stop(proc)
        subprocess.run([*HERD, "down"], env=server_env, cwd=ROOT, capture_output=True, timeout=120)
