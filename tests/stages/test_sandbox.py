"""The HumanEval sandbox, against real programs in real processes: an infinite loop, memory and fork bombs, a
program that deletes files, one that opens sockets, and HumanEval-style programs that pass and fail.

As root (here and in CI) the security tests run twice: with the confinement this machine allows (namespaces)
and with what root gets without namespaces (a container without CAP_SYS_ADMIN: uid drop, socket guard).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.errors import ConfigError
from stages.evaluation.sandbox import (
    N_UIDS,
    RunResult,
    SandboxConfig,
    _execute,
    _lease,
    _Plan,
    _plan_key,
    _resolve,
    pass_at_k,
    run_program,
    run_programs,
    sandbox_capabilities,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox uses Linux process controls")

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
# a uid range of this test process's own, so that sandboxes of other processes on the machine never count as ours
UID_BASE = 40000 + (os.getpid() % 40) * N_UIDS


def _cfg(**changes) -> SandboxConfig:
    return SandboxConfig(sandbox_uid=UID_BASE, memory_mb=256, timeout_s=5.0).derive(**changes)


MODES = ["confined"] + (["root-without-namespaces"] if IS_ROOT else [])


@pytest.fixture(params=MODES)
def run(request):
    """``run(code, cfg) -> RunResult`` under the machine's confinement, or (as root) under the fallback."""

    def _run(code: str, cfg: SandboxConfig) -> RunResult:
        if request.param == "confined":
            return run_program(code, cfg)
        plan = _Plan(python=_resolve(_plan_key(cfg)).python, uid_drop=True)
        with _lease(cfg, True) as uid:
            return _execute(code, cfg, plan, uid)

    return _run


def _sandbox_pids() -> list[int]:
    """Processes (zombies too) whose real uid is one of this test's sandbox uids."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        uid = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Uid:"))
        if UID_BASE <= uid < UID_BASE + N_UIDS:
            found.append(int(d.name))
    return found


def _assert_nothing_left() -> None:
    if not IS_ROOT:  # programs run as this user: their processes cannot be told apart from ours
        return
    deadline = time.monotonic() + 1.0
    while (left := _sandbox_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes of the sandbox uids survived the run: {left}"


def _humaneval(completion: str) -> str:
    prompt = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    return prompt + completion + "\n" + test + "\ncheck(add)\n"


# ------------------------------------------------------------------------------------------------ scoring


def test_humaneval_programs_pass_and_fail_in_parallel() -> None:
    programs = [_humaneval("    return a + b\n"), _humaneval("    return a - b\n"), _humaneval("    return a +\n"),
                _humaneval("    while True:\n        pass\n")]
    results = run_programs(programs, _cfg(workers=2, timeout_s=1.5))
    assert [r.status for r in results] == ["passed", "failed", "failed", "timeout"]
    assert [r.passed for r in results] == [True, False, False, False]
    assert "AssertionError" in results[1].detail
    assert "SyntaxError" in results[2].detail
    assert run_programs([], _cfg()) == []


def test_pass_at_k_matches_hand_computed_values() -> None:
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 7, 1) == pytest.approx(0.7)  # pass@1 is the fraction correct
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer wrong samples than k: a correct one is always drawn
    with pytest.raises(ConfigError, match="k=6"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ConfigError, match="c=7"):
        pass_at_k(5, 7, 1)


def test_config_rejects_nonsense_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValidationError, match="memory_mb"):
        SandboxConfig(memory_mb=8)


def test_capabilities_report_the_active_confinement() -> None:
    caps = sandbox_capabilities(_cfg())
    assert caps["root"] is IS_ROOT
    assert caps["network"].startswith(("network namespace", "socket guard"))
    assert "RLIMIT_NPROC" in caps["rlimits"] and caps["no_new_privs"] is True
    assert os.access(caps["python"], os.X_OK)


# ------------------------------------------------------------------------------------------------ confinement


def test_infinite_loop_times_out_and_is_gone(run) -> None:
    t0 = time.monotonic()
    res = run("while True:\n    pass\n", _cfg(timeout_s=1.5))
    took = time.monotonic() - t0
    assert res.status == "timeout" and not res.passed, res
    assert 1.5 <= took < 1.5 + 2.0
    _assert_nothing_left()


def test_cpu_limit_counts_as_timeout() -> None:
    res = run_program("while True:\n    pass\n", _cfg(cpu_s=1, timeout_s=10.0))
    assert res.status == "timeout" and "CPU" in res.detail, res
    assert res.elapsed_s < 10.0


@pytest.mark.parametrize("bomb", ["x = bytearray(10**10)\n",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"],
                         ids=["one-allocation", "growing-list"])
def test_memory_bomb_gets_memory_error(run, bomb: str) -> None:
    res = run(bomb, _cfg(memory_mb=256))
    assert res.status == "failed" and "MemoryError" in res.detail, res
    assert res.elapsed_s < 5.0


@pytest.mark.parametrize("bomb", ["import os\nwhile True:\n    os.fork()\n",
                                  # every child leaves the process group and ignores failed forks: the
                                  # bomb keeps the process table full until it is killed
                                  "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n"
                                  "            os.setsid()\n    except OSError:\n        pass\n"],
                         ids=["plain", "setsid-persistent"])
def test_fork_bomb_is_contained_and_cleaned_up(run, bomb: str) -> None:
    cfg = _cfg(timeout_s=2.0, max_processes=16)
    t0 = time.monotonic()
    res = run(bomb, cfg)
    assert not res.passed and res.status in ("failed", "timeout"), res
    assert time.monotonic() - t0 < 2.0 + 3.0
    _assert_nothing_left()
    assert run(_humaneval("    return a + b\n"), cfg).passed  # the machine (and the uid) are fine afterwards


def _world_traversable(path: Path) -> bool:
    """Whether any uid can reach ``path``: every folder from / down to it has the others' execute bit."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def test_program_cannot_modify_herd_home_or_the_checkout(run) -> None:
    caps = sandbox_capabilities(_cfg())
    if not caps["root"] and not caps["filesystem"].startswith("read-only"):
        pytest.skip("not root and no mount namespace: programs can write what this user can (see the module doc)")
    home = Path(tempfile.mkdtemp(prefix="herd-home-", dir="/tmp"))  # world-traversable, unlike pytest's tmp_path
    probe = ROOT / ".herd-sandbox-probe"
    try:
        home.chmod(0o755)
        (home / "sub").mkdir(mode=0o755)
        for f in (home / "store.db", home / "sub" / "model.safetensors", probe):
            f.write_text("keep")
            f.chmod(0o644)
        files = [str(home / "store.db"), str(home / "sub" / "model.safetensors"), str(probe)]
        dirs = [str(home), str(home / "sub"), str(ROOT)]
        # a checkout under a private folder (mktemp -d: 0700) is out of the sandbox uid's reach altogether; then
        # only the attempts below are checked for it, not that it reads
        readable = files if _world_traversable(ROOT) else files[:2]
        code = f"""\
import os, shutil

files, dirs = {files!r}, {dirs!r}
for f in {readable!r}:  # reachable and readable: what fails below fails for the confinement, not a wrong path
    assert open(f).read() == "keep", f
done = []


def attempt(what, fn, *args):
    try:
        fn(*args)
        done.append(what)
    except OSError:
        pass


for f in files:
    attempt("remove " + f, os.remove, f)
    attempt("truncate " + f, open, f, "w")
    attempt("rename " + f, os.rename, f, f + ".moved")
    attempt("chmod " + f, os.chmod, f, 0o666)
for d in dirs:
    attempt("create in " + d, open, os.path.join(d, "new-file"), "w")
for d in dirs[:2]:
    attempt("rmtree " + d, shutil.rmtree, d)
raise SystemExit("changed: " + "; ".join(done) if done else 0)
"""
        res = run(code, _cfg())
        assert res.passed, res.detail
        for f in files:
            assert Path(f).read_text() == "keep"
        assert not any(Path(d, "new-file").exists() for d in dirs)
        assert sorted(p.name for p in home.rglob("*")) == ["model.safetensors", "store.db", "sub"]
    finally:
        for leftover in (probe, ROOT / ".herd-sandbox-probe.moved", ROOT / "new-file"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)


def test_program_cannot_reach_the_network(run) -> None:
    with socket.socket() as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        udp.bind(("127.0.0.1", 0))
        port, uport = server.getsockname()[1], udp.getsockname()[1]
        code = f"""\
import socket

reached = []


def tcp():
    s = socket.socket()
    s.settimeout(2)
    s.connect(("127.0.0.1", {port}))


def connection():
    socket.create_connection(("127.0.0.1", {port}), timeout=2)


def datagram():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("127.0.0.1", {uport}))


for name, fn in [("socket.connect", tcp), ("create_connection", connection), ("udp sendto", datagram)]:
    try:
        fn()
        reached.append(name)
    except OSError:
        pass
raise SystemExit("reached: " + ", ".join(reached) if reached else 0)
"""
        res = run(code, _cfg())
        assert res.passed, res.detail
        server.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived
        with pytest.raises(BlockingIOError):
            udp.recvfrom(16)
        # and the listeners did work: from this process, both are reached
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            server.setblocking(True)
            server.settimeout(2)
            server.accept()[0].close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", uport))
        udp.settimeout(2)
        assert udp.recvfrom(16)[0] == b"x"


def test_program_runs_in_an_empty_private_directory_without_herd_home(run, monkeypatch) -> None:
    monkeypatch.setenv("HERD_HOME", "/somewhere/secret")
    code = """\
import os, sys

assert "HERD_HOME" not in os.environ, "HERD_HOME leaked"
assert os.listdir(".") == [], os.listdir(".")
with open("scratch.txt", "w") as fh:
    fh.write("the working directory is writable")
sys.exit(os.getcwd())
"""
    res = run(code, _cfg())
    assert res.status == "failed", res
    workdir = Path(res.detail)
    assert workdir.is_absolute() and workdir.name == "work", res.detail
    assert not workdir.parent.exists()  # removed after the run
