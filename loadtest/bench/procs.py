"""Processes: start them pinned to a core, read their CPU time and RSS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
TASKSET = shutil.which("taskset")
CORES = os.cpu_count() or 1
#: The server gets core 0, the load generator core 1 (when there are two).
SERVER_CORES = "0"
CLIENT_CORES = "1" if CORES > 1 else "0"


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, from /proc/<pid>/stat: user space, and
    the kernel (system calls, and the loopback receiver's TCP work that this
    kernel charges to the sender)."""
    fields = _stat(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _stat(pid: int | str) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name (which may
    hold spaces and parentheses): state first, then the parent's pid."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_split(pid))


def cpu_seconds_exact(pid: int) -> float:
    """Time on CPU of every thread of a process, in ns from the scheduler
    (/proc/<pid>/task/*/schedstat): for Redis, whose share of a phase is a few
    clock ticks, too few for /proc/<pid>/stat's 10 ms resolution."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_bytes().split()[0])
    return total / 1e9


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_self() -> None:
    """The harness (publisher, bookkeeping) shares the load generator's core."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {int(c) for c in CLIENT_CORES.split(",")})


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_stat(proc.name)[1]) == pid:
                found.append(int(proc.name))
    return found


class PinnedTree:
    """A local server's process tree (PostgreSQL: the postmaster and its
    backends) moved to the load generator's core, so it does not take the
    server core from the server measured; backends forked later inherit the
    postmaster's affinity.  :meth:`restore` gives the tree back the
    postmaster's former affinity."""

    def __init__(self, root: int) -> None:
        """Raises OSError when the root may not be moved (not permitted,
        or a core it may not use); nothing is moved then."""
        self.root = root
        self.before = os.sched_getaffinity(root)
        cores = {int(c) for c in CLIENT_CORES.split(",")}
        os.sched_setaffinity(root, cores)
        for pid in _children(root):
            with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                os.sched_setaffinity(pid, cores)

    def restore(self) -> None:
        for pid in (self.root, *_children(self.root)):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, self.before)


def pin_postgres(backend_pid: int) -> PinnedTree | str:
    """Pin the PostgreSQL server that runs backend ``backend_pid`` (from
    ``pg_backend_pid()``) to the load generator's core; or why not."""
    if CORES < 2:
        return "one core: nothing to move it off"
    try:
        postmaster = int(_stat(backend_pid)[1])
        comm = Path(f"/proc/{postmaster}/comm").read_text().strip()
        if not comm.startswith("postgres"):
            return f"the backend's parent is {comm!r}, not a postmaster"
    except OSError as exc:
        return f"not a local process ({type(exc).__name__}: {exc.strerror})"
    try:
        return PinnedTree(postmaster)
    except OSError as exc:
        return f"its postmaster may not be moved ({type(exc).__name__}: {exc.strerror})"


def pinned(cmd: list[str], cores: str) -> list[str]:
    if TASKSET and CORES > 1:
        return [TASKSET, "-c", cores, *cmd]
    return cmd


class Server:
    """One server process, started pinned, its output in a log file."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            pinned(cmd, SERVER_CORES),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def cpu_split(self) -> tuple[float, float]:
        return cpu_split(self.proc.pid)

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def wait_port(self, port: int, within: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                pass
            if loop.time() > deadline:
                raise RuntimeError(f"{self.name} did not open port {port}:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def redis_pid(url: str = "redis://127.0.0.1:6379/0") -> int | None:
    """The local Redis server's pid, to charge its CPU to the runs that use it."""
    try:
        import redis

        info: Any = redis.Redis.from_url(url).info("server")
        pid = int(info["process_id"])
        os.stat(f"/proc/{pid}")
        return pid
    except Exception:
        return None
