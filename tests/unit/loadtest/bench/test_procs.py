"""The harness's process pinning: PostgreSQL's tree moved off the server core."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.bench import procs

# A parent that starts one child at once and another when told (a line on
# stdin), as the postmaster forks backends while a run goes on.
TREE = """
import subprocess, sys, time
first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(first.pid, flush=True)
sys.stdin.readline()
later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(later.pid, flush=True)
time.sleep(60)
"""


def test_a_tree_is_pinned_with_what_it_forks_later_and_restored() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        _pin_and_restore(parent)


def _pin_and_restore(parent: subprocess.Popen[str]) -> None:
    assert parent.stdin is not None and parent.stdout is not None
    try:
        first = int(parent.stdout.readline())
        before = os.sched_getaffinity(parent.pid)
        client = {int(c) for c in procs.CLIENT_CORES.split(",")}
        tree = procs.PinnedTree(parent.pid)
        assert os.sched_getaffinity(parent.pid) == client
        assert os.sched_getaffinity(first) == client
        parent.stdin.write("\n")
        parent.stdin.flush()
        later = int(parent.stdout.readline())
        assert os.sched_getaffinity(later) == client
        tree.restore()
        assert all(os.sched_getaffinity(pid) == before for pid in (parent.pid, first, later))
    finally:
        for pid in procs._children(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_only_a_postmasters_backend_is_followed_to_its_server() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        time.sleep(0.1)
        outcome = procs.pin_postgres(child.pid)
        child.kill()
    assert isinstance(outcome, str) and "not a postmaster" in outcome
    gone = procs.pin_postgres(child.pid)
    assert isinstance(gone, str) and gone.startswith("not a local process")


ONE_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_root_that_may_not_be_moved_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A core this machine does not have: the kernel refuses (EINVAL), as
    # it refuses a process of another user to a harness that is not root.
    monkeypatch.setattr(procs, "CLIENT_CORES", str(os.cpu_count() or 1))
    cmd = [sys.executable, "-c", ONE_CHILD]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        before = os.sched_getaffinity(child)
        try:
            with pytest.raises(OSError):
                procs.PinnedTree(parent.pid)
            assert os.sched_getaffinity(parent.pid) == before
            assert os.sched_getaffinity(child) == before
        finally:
            os.kill(child, 9)
            parent.kill()
