"""Running model-written Python programs (HumanEval completions) confined, for pass@k scoring.

A program is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"``; it passes when it exits with
status 0 within the wall-clock timeout. Each program runs in its own process, in an empty temporary working
directory, with a minimal environment (no ``HERD_HOME``, no tokens), and with every layer of confinement
this machine allows. ``sandbox_capabilities()`` says which layers are active; a probe decides them once per
process (a few tiny launches, ~0.3 s).

Always:

- a new session and process group, SIGKILLed as a whole at the end; a waiter process between herd and the
  program enforces the wall-clock timeout (``timeout_s``) and kills and reaps whatever the program started
  (as a child subreaper, so nothing is left as a zombie where init does not reap, as in containers);
- rlimits: CPU seconds (``cpu_s``; a program that is a PID namespace's init ignores SIGXCPU and is killed at
  the hard limit, a second later; either way the result is a timeout), address space (``memory_mb``: a memory
  bomb gets ``MemoryError``), file size, open files, no core dumps, processes (``max_processes``: a fork bomb
  gets ``BlockingIOError``);
- ``PR_SET_NO_NEW_PRIVS`` (set-uid binaries grant nothing) and a parent-death signal;
- the interpreter runs with ``-S -s -B``: the standard library only (HumanEval's tests and canonical solutions
  need no more; a completion importing numpy fails), no site-packages and none of their ``.pth`` start-up
  code; ``PYTHONHASHSEED=0`` for reproducible runs. As root it is the first interpreter the sandbox uid can
  execute (a pyenv under ``/root`` is out of its reach; ``/usr/bin/python3.x`` then runs the programs).

As root (here and in CI), in addition:

- the program runs as an unprivileged uid/gid with no supplementary groups, its own for the time it runs: the
  first of ``sandbox_uid .. sandbox_uid + 255`` that no other program on the machine holds (an flock under
  ``/tmp/herd-sandbox-uids``, shared by every herd process). Root's files that are not world-writable (the
  checkout, ``$HERD_HOME``) cannot be changed or deleted, ``RLIMIT_NPROC`` is enforced (root ignores it) and
  counts this program's processes alone, and without a PID namespace the run ends by killing every process of
  that uid. Those uids must belong to no user or service of the machine;
- a network namespace: only a loopback that is down, so no connection to anything, local or remote;
- a mount namespace: every mount read-only (``mount_setattr(AT_RECURSIVE)``, Linux >= 5.12), the working
  directory a private tmpfs of ``workdir_mb``: nothing outside it can be written even where permissions would
  allow (``/tmp``, ``/dev/shm``, files the sandbox uid could own), and disk use is bounded;
- a PID namespace whose init is the program, with its own ``/proc``: when the program ends or is killed, the
  kernel kills everything it started (even children that called ``setsid``) and reaps them, and the program
  sees no other process of the machine (no command lines, no environments).

Root without namespaces (a container without CAP_SYS_ADMIN) keeps the uid drop, so files stay protected, and
gets the socket guard below instead of a network namespace.

Not as root: the same namespaces inside an unprivileged user namespace where the kernel allows one (the
program keeps the user's uid, but the filesystem is read-only and the network absent; ``RLIMIT_NPROC`` counts
the processes of that namespace on Linux >= 5.14). Where no namespace can be made (old kernels, Ubuntu's
AppArmor restriction of user namespaces, container seccomp profiles), the network is blocked by a guard that
replaces ``socket.socket`` before the program runs (best effort: a program can still start a subprocess that
uses the network), files are protected only by the user's permissions (the program can write what the user
can write: run herd as root, or where user namespaces are allowed, for real confinement), ``RLIMIT_NPROC`` is
set to the user's current count plus ``max_processes``, and the waiter kills the program's descendants (it is
their subreaper); a warning is logged.

Reads are not confined: world-readable files (the checkout's sources, a world-readable ``$HERD_HOME``) stay
readable. As root, files only their owner can read (mode 0600) are out of the sandbox uid's reach; not as
root, the program reads whatever the user can read (with no network and stdout discarded, only the last line
of stderr, ``RunResult.detail``, leaves the sandbox).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import math
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common import StageConfig
from stages.errors import ConfigError, TransientIOError

log = logging.getLogger(__name__)

N_UIDS = 256  # as root: uids sandbox_uid .. sandbox_uid + 255, one per running program on the machine


class SandboxConfig(StageConfig):
    """How model-written programs are confined and how many run at once."""

    timeout_s: float = Field(10.0, gt=0, le=3600, description="Wall-clock seconds a program may run before it "
                             "is killed (with everything it started) and counted as a timeout.")
    memory_mb: int = Field(512, ge=64, description="Address-space limit of each process of a program, in MiB "
                           "(RLIMIT_AS); allocating more raises MemoryError.")
    cpu_s: int = Field(10, ge=1, description="CPU seconds per process (RLIMIT_CPU); past them it is killed "
                       "and counts as a timeout.")
    max_processes: int = Field(32, ge=1, le=4096, description="Processes (threads count too) a program may have "
                               "at once (RLIMIT_NPROC); a fork bomb stops there.")
    max_file_mb: int = Field(16, ge=1, description="Largest file a program may write, in MiB (RLIMIT_FSIZE); "
                             "stderr counts too.")
    max_open_files: int = Field(64, ge=16, description="Open file descriptors per process (RLIMIT_NOFILE).")
    workdir_mb: int = Field(64, ge=1, description="Size of the private tmpfs that is the working directory, in "
                            "MiB (where a mount namespace is available).")
    workers: int = Field(2, ge=1, le=64, description="Programs run at once by run_programs.")
    sandbox_uid: int = Field(64000, ge=1, le=2**31 - N_UIDS, description="When herd runs as root: each program "
                             f"runs as its own uid/gid, the first free one of sandbox_uid .. sandbox_uid + "
                             f"{N_UIDS - 1} on this machine. These ids must belong to no user or other process.")
    python: str = Field("", description="Interpreter that runs the programs; empty: this one if the sandbox uid "
                        "can run it, else the first python3 of /usr/local/bin, /usr/bin, /bin it can run.")


@dataclass(frozen=True)
class RunResult:
    """How one program ended. ``detail``: the last line of its stderr, or why it was stopped."""

    passed: bool
    status: Literal["passed", "failed", "timeout", "error"]
    detail: str
    elapsed_s: float = 0.0


# ------------------------------------------------------------------------------------------------ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of the Codex paper (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``,
    the probability that at least one of ``k`` samples drawn without replacement from ``n`` (``c`` correct)
    is correct, computed as the paper's numerically stable product."""
    if n < 1 or not 0 <= c <= n:
        raise ConfigError(f"pass_at_k: need n >= 1 samples and 0 <= c <= n correct ones (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ConfigError(f"pass_at_k: k={k} must be between 1 and n={n} (the samples per problem): lower k "
                          f"or draw more samples")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ------------------------------------------------------------------------------------------ kernel calls

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (syscalls >= 424 are unified)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_READONLY = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
_FD_LIMIT = max(1 << 16, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        # stderr is the run's capture file: the reason shows in RunResult.detail
        os.write(2, f"herd sandbox: {what} failed: {os.strerror(e)}\n".encode())
        raise OSError(e, f"{what}: {os.strerror(e)}")


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """Which layers a launch applies (decided once per process by probing)."""

    python: str
    uid_drop: bool = False  # root: run as a leased uid
    userns: bool = False  # not root: the namespaces below inside a user namespace
    netns: bool = False
    mntns: bool = False  # read-only mounts, tmpfs working directory
    pidns: bool = False
    procfs: bool = False  # the PID namespace's own /proc (needs mntns and pidns)

    @property
    def namespaces(self) -> int:
        return ((CLONE_NEWUSER if self.userns else 0) | (CLONE_NEWNET if self.netns else 0)
                | (CLONE_NEWNS if self.mntns else 0) | (CLONE_NEWPID if self.pidns else 0))


@dataclass(frozen=True)
class _Launch:
    """Everything the child needs, computed before the fork (the child only makes system calls)."""

    plan: _Plan
    uid: int  # the uid/gid the program runs as
    gid: int
    work: bytes
    tmpfs_opts: bytes
    limits: tuple[tuple[int, tuple[int, int]], ...]
    maps: tuple[tuple[bytes, bytes], ...]  # user namespace: (/proc/self/<file>, content)
    timeout_s: float
    cpu_s: int

    def __call__(self) -> None:  # preexec_fn: in the child, between fork and exec
        plan = self.plan
        if plan.namespaces:
            _ok(_libc.unshare(plan.namespaces), "unshare")
        for path, content in self.maps:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        self._fork_waiter()
        if plan.mntns:
            _ok(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
            _ok(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(b"/"),
                              ctypes.c_long(AT_RECURSIVE), ctypes.byref(_READONLY),
                              ctypes.c_long(ctypes.sizeof(_READONLY))), "mount_setattr read-only")
            _ok(_libc.mount(b"tmpfs", self.work, b"tmpfs", MS_NOSUID | MS_NODEV, self.tmpfs_opts), "tmpfs")
            if plan.procfs:
                _ok(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "/proc")
        for which, value in self.limits:
            resource.setrlimit(which, value)
        if plan.uid_drop:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
        _ok(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _ok(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after the uid change
        os.chdir(self.work)

    def _fork_waiter(self) -> None:
        """Fork: the child goes on to exec the program; this process, the waiter, enforces the wall-clock
        timeout, makes sure nothing the program started survives it, and exits as the program did (a timeout
        as SIGKILL).

        In a PID namespace the program is the namespace's init: when it ends, the kernel kills and reaps
        everything else in the namespace. Without one, the waiter is a child subreaper (orphans of the program
        become its children, so none is left as a zombie for an init that may never reap it, as in
        containers): as root it kills every process of the sandbox uid (``kill(-1)`` as that uid, atomic with
        respect to fork), else its children until none is left; then it reaps them."""
        _ok(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        if not self.plan.pidns:
            _ok(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
        pid = os.fork()
        if pid == 0:
            return
        try:
            # the pipe through which Popen learns that exec happened is one of these: Popen returns once the
            # child has exec'd (or failed to), not when the waiter exits
            os.closerange(3, _FD_LIMIT)
            timed_out = not _wait_exit(pid, self.timeout_s)
            if timed_out:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            status, usage = _wait4(pid)
            if not self.plan.pidns:
                self._kill_leftovers()
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                # the hard CPU limit (cpu_s + 1; rusage is sampled, a little under what the kernel counted)
                if sig == signal.SIGKILL and not timed_out and usage.ru_utime + usage.ru_stime >= self.cpu_s:
                    sig = signal.SIGXCPU
                with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
                    signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
                os._exit(128 + sig)
            os._exit(os.waitstatus_to_exitcode(status))
        finally:
            os._exit(255)

    def _kill_leftovers(self) -> None:
        if self.plan.uid_drop:
            sweeper = os.fork()
            if sweeper == 0:
                try:
                    os.setgroups([])
                    os.setresgid(self.gid, self.gid, self.gid)
                    os.setresuid(self.uid, self.uid, self.uid)
                    if os.getresuid() == (self.uid,) * 3 and self.uid != 0:  # never kill(-1) as root
                        os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            with contextlib.suppress(ChildProcessError):
                while True:  # the sweeper, and every orphan of the program (reparented to us)
                    _waitpid(-1)
        while kids := _children(os.getpid()):
            for kid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)
            for kid in kids:  # their children become ours: the next round gets them
                with contextlib.suppress(ChildProcessError):
                    _waitpid(kid)


def _wait4(pid: int) -> tuple[int, resource.struct_rusage]:
    while True:
        try:
            _, status, usage = os.wait4(pid, 0)
            return status, usage
        except InterruptedError:
            continue


def _waitpid(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN
        kids = []
        for f in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(f.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(f.parent.name))
        return kids


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the child ``pid`` to exit, without reaping it (its pid, hence its
    process group id, stays reserved). False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    deadline = time.monotonic() + timeout
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while (left := deadline - time.monotonic()) > 0:
                if poller.poll(max(1, math.ceil(left * 1000))):
                    return True
            return False
        finally:
            os.close(fd)
    pause = 0.001
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return False


# ------------------------------------------------------------------------------------------------ uids

_LOCKS = Path("/tmp/herd-sandbox-uids")


@contextlib.contextmanager
def _lease(cfg: SandboxConfig, uid_drop: bool) -> Iterator[int]:
    """The uid a program runs as: as root, one no other program on this machine is using (an flock on
    ``/tmp/herd-sandbox-uids/<uid>``, shared by every herd process), so its process count and the final
    ``kill(-1)`` concern that program alone; else this user's."""
    if not uid_drop:
        yield os.getuid()
        return
    with contextlib.suppress(FileExistsError):
        _LOCKS.mkdir(mode=0o700)
    st = _LOCKS.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"sandbox: {_LOCKS} must be a directory only root can write; remove it and retry")
    while True:
        for uid in range(cfg.sandbox_uid, cfg.sandbox_uid + N_UIDS):
            try:
                fd = os.open(_LOCKS / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ running

_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_GRACE_S = 5.0

_GUARD = '''\
def _herd_guard():
    import socket, _socket

    def no_network(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the herd sandbox")

    class Socket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    class RawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    socket.socket = socket.SocketType = Socket
    _socket.socket = _socket.SocketType = RawSocket
    for name in ("create_connection", "create_server", "fromfd", "socketpair", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, no_network)


_herd_guard()
del _herd_guard
__file__ = {path!r}
with open(__file__, encoding="utf-8") as _herd_fh:
    _herd_code = compile(_herd_fh.read(), __file__, "exec")
del _herd_fh
exec(_herd_code)
'''


def _limits(cfg: SandboxConfig, plan: _Plan) -> tuple[tuple[int, tuple[int, int]], ...]:
    mib = 1 << 20
    nproc = cfg.max_processes
    if not plan.uid_drop and not plan.userns:
        nproc += _tasks_of(os.getuid())  # the limit counts every process of the user
    return (
        # SIGXCPU at cpu_s; SIGKILL a second later for a PID namespace's init, which ignores SIGXCPU
        (resource.RLIMIT_CPU, (cfg.cpu_s, cfg.cpu_s + 1)),
        (resource.RLIMIT_AS, (cfg.memory_mb * mib, cfg.memory_mb * mib)),
        (resource.RLIMIT_FSIZE, (cfg.max_file_mb * mib, cfg.max_file_mb * mib)),
        (resource.RLIMIT_NOFILE, (cfg.max_open_files, cfg.max_open_files)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
    )


def _tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` (what RLIMIT_NPROC counts)."""
    n = 0
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        with contextlib.suppress(OSError):
            n += task.stat().st_uid == uid
    return n


def _execute(code: str, cfg: SandboxConfig, plan: _Plan, uid: int) -> RunResult:
    """Run ``code`` under ``plan`` as ``uid`` (from ``_lease``)."""
    gid = uid if plan.uid_drop else os.getgid()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="herd-sandbox-"))
    try:
        os.chmod(tmp, 0o711)  # the sandbox uid may enter (and read program.py), not list
        program = tmp / "program.py"
        program.write_text(code, encoding="utf-8")
        script = program
        if not plan.netns:
            script = tmp / "guard.py"
            script.write_text(_GUARD.format(path=str(program)), encoding="utf-8")
        for f in (program, script):
            os.chmod(f, 0o644)
        work = tmp / "work"
        work.mkdir(mode=0o700)
        if plan.uid_drop:
            os.chown(work, uid, gid)
        maps: tuple[tuple[bytes, bytes], ...] = ()
        if plan.userns:
            maps = ((b"/proc/self/setgroups", b"deny"), (b"/proc/self/uid_map", f"{uid} {uid} 1".encode()),
                    (b"/proc/self/gid_map", f"{gid} {gid} 1".encode()))
        launch = _Launch(plan=plan, uid=uid, gid=gid, work=os.fsencode(work),
                         tmpfs_opts=f"size={cfg.workdir_mb}m,mode=0700,uid={uid},gid={gid}".encode(),
                         limits=_limits(cfg, plan), maps=maps, timeout_s=cfg.timeout_s,
                         cpu_s=cfg.cpu_s)
        env = {"PATH": _ENV_PATH, "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen([plan.python, "-S", "-s", "-B", str(script)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(tmp),
                                        close_fds=True, start_new_session=True, preexec_fn=launch)
            except (OSError, subprocess.SubprocessError) as exc:
                return RunResult(False, "error", f"could not start the program: {_tail(err) or exc}",
                                 time.monotonic() - t0)
            # the waiter enforces the timeout; the grace covers its clean-up
            waited = _wait_exit(proc.pid, cfg.timeout_s + _GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (its id is reserved: unreaped)
            rc = proc.wait()
            elapsed = time.monotonic() - t0
            detail = _tail(err)
        if not waited or rc == -signal.SIGKILL and elapsed >= cfg.timeout_s:
            return RunResult(False, "timeout", f"timed out after {cfg.timeout_s:g} s", elapsed)
        if rc == 0:
            return RunResult(True, "passed", "", elapsed)
        if rc == -signal.SIGXCPU:
            return RunResult(False, "timeout", f"CPU limit of {cfg.cpu_s} s exceeded", elapsed)
        if rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            return RunResult(False, "failed", detail or f"killed by {name}", elapsed)
        return RunResult(False, "failed", detail or f"exit status {rc}", elapsed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(fh: Any, nbytes: int = 4096, width: int = 300) -> str:
    """The last non-empty line of what the program wrote to stderr."""
    try:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - nbytes))
        text = fh.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:width] if lines else ""


# ------------------------------------------------------------------------------------------------ probing


def _candidates(cfg: SandboxConfig) -> list[str]:
    if cfg.python:
        return [cfg.python]
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", "")]
    found += [shutil.which(name, path=_ENV_PATH) or "" for name in (ver, "python3")]
    return [p for p in dict.fromkeys(found) if p]


_PROBE = ("import os, sys\n"
          "open('probe', 'w').close()\n"
          "sys.exit(0 if os.getuid() == {uid} else 3)\n")


def _probe(cfg: SandboxConfig, plan: _Plan) -> bool:
    with _lease(cfg, plan.uid_drop) as uid:
        res = _execute(_PROBE.format(uid=uid), cfg, plan, uid)
    if not res.passed:
        log.debug("sandbox probe %s: %s (%s)", plan, res.status, res.detail)
    return res.passed


@functools.cache
def _resolve(cfg: SandboxConfig) -> _Plan:
    probe_cfg = SandboxConfig(sandbox_uid=cfg.sandbox_uid, python=cfg.python, timeout_s=20)
    root = os.geteuid() == 0
    python = next((p for p in _candidates(cfg) if _probe(probe_cfg, _Plan(python=p, uid_drop=root))), None)
    if python is None:
        who = f"uid {cfg.sandbox_uid}" if root else "this user"
        raise ConfigError(f"sandbox.python: none of {_candidates(cfg)} can be run by {who}; set python to an "
                          f"interpreter outside private directories (e.g. /usr/bin/python3)")
    base = _Plan(python=python, uid_drop=root)
    if not root:
        if not _probe(probe_cfg, _replace(base, userns=True)):
            log.warning("sandbox: no namespaces available (not root, no user namespaces): programs run as this "
                        "user with a socket guard instead of a network namespace; run as root for confinement")
            return base
        base = _replace(base, userns=True)
    layers = {name: _probe(probe_cfg, _replace(base, **{name: True})) for name in ("netns", "mntns", "pidns")}
    if layers["mntns"] and layers["pidns"]:
        layers["procfs"] = _probe(probe_cfg, _replace(base, mntns=True, pidns=True, procfs=True))
    plan = _replace(base, **layers)
    if plan != base and not _probe(probe_cfg, plan):
        log.warning("sandbox: the namespaces work one by one but not together; running without them")
        plan = base
    if not plan.netns:
        log.warning("sandbox: no network namespace on this machine; blocking sockets with an in-process guard "
                    "(best effort: a program could still start a subprocess that uses the network)")
    if not plan.mntns and not plan.uid_drop:
        log.warning("sandbox: no mount namespace and not root: programs can write whatever this user can write")
    log.info("sandbox: %s", _describe(plan, cfg))
    return plan


def _replace(plan: _Plan, **changes: Any) -> _Plan:
    return _Plan(**(asdict(plan) | changes))


def _describe(plan: _Plan, cfg: SandboxConfig) -> dict[str, Any]:
    if plan.netns:
        network = "network namespace (no interfaces up)" + (" in a user namespace" if plan.userns else "")
    else:
        network = "socket guard (best effort)"
    if plan.mntns:
        filesystem = f"read-only mount namespace, {cfg.workdir_mb} MiB tmpfs working directory"
    elif plan.uid_drop:
        filesystem = "file permissions of the sandbox uid"
    else:
        filesystem = "file permissions of this user (unprotected)"
    return {
        "root": plan.uid_drop,
        "python": plan.python,
        "uid": f"{cfg.sandbox_uid}..{cfg.sandbox_uid + N_UIDS - 1}, one per running program" if plan.uid_drop
               else os.getuid(),
        "user_namespace": plan.userns,
        "network": network,
        "filesystem": filesystem,
        "pid_namespace": plan.pidns,
        "private_proc": plan.procfs,
        "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE"],
        "no_new_privs": True,
        "cleanup": "waiter: timeout, then " + ("PID namespace teardown" if plan.pidns else
                                               "kill(-1) as the program's uid" if plan.uid_drop else
                                               "kill of the program's descendants") + ", reaping",
    }


# ------------------------------------------------------------------------------------------------ API


def sandbox_capabilities(cfg: SandboxConfig | None = None) -> dict[str, Any]:
    """Which confinement is active on this machine (probed once per process and config)."""
    cfg = cfg or SandboxConfig()
    return _describe(_resolve(_plan_key(cfg)), cfg)


def _plan_key(cfg: SandboxConfig) -> SandboxConfig:
    """The plan depends only on who runs what: share the probe between configs that differ in limits."""
    return SandboxConfig(sandbox_uid=cfg.sandbox_uid, python=cfg.python)


def run_program(code: str, cfg: SandboxConfig) -> RunResult:
    """Run one program confined; it passes iff it exits with status 0 within ``cfg.timeout_s``."""
    plan = _resolve(_plan_key(cfg))
    with _lease(cfg, plan.uid_drop) as uid:
        try:
            return _execute(code, cfg, plan, uid)
        except OSError as exc:  # the temporary directory, a chown: the machine, not the program
            if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise TransientIOError(f"sandbox: {exc}; free disk space, file descriptors or memory and "
                                       f"retry") from exc
            return RunResult(False, "error", f"sandbox: {exc}")


def run_programs(codes: Sequence[str], cfg: SandboxConfig) -> list[RunResult]:
    """Run ``codes`` confined, ``cfg.workers`` at a time; results in the order of ``codes``."""
    if not codes:
        return []
    _resolve(_plan_key(cfg))  # probe once, before the threads
    if cfg.workers == 1 or len(codes) == 1:
        return [run_program(c, cfg) for c in codes]
    with ThreadPoolExecutor(max_workers=min(cfg.workers, len(codes)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda c: run_program(c, cfg), codes))
