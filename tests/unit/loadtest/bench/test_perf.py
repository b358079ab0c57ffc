"""``--perf``: a real perf recording of a process that spends its time in
the kernel is read back as shares by binary and by symbol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.bench.scenarios import summarize_perf

# Writes to a socket pair: most of its time is the kernel's.
BUSY = """
import socket
a, b = socket.socketpair()
for _ in range(150_000):
    a.send(b"x" * 200)
    b.recv(300)
"""


def test_a_perf_recording_is_summarized_by_binary_and_symbol(tmp_path: Path) -> None:
    out = tmp_path / "busy.perf"
    record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-o", str(out)]
    subprocess.run(
        [*record, sys.executable, "-c", BUSY],
        check=True,
        capture_output=True,
    )
    summary = summarize_perf(out)
    assert 30 < summary["kernel_pct"] <= 100, summary
    assert summary["dso_pct"][0][0].startswith("[kernel"), summary
    names = [name for name, _ in summary["symbol_pct"]]
    assert any(name.startswith("[k] ") for name in names), names
    assert all(0 < pct <= 100 for _, pct in summary["symbol_pct"]), summary
