"""A short chaos run (``loadtest/chaos.py``, about 40 s of faults): two hub
nodes over Redis and one PostgreSQL store, durable publishers, subscribers
that resume with ``replay.after``, subscribers of a public channel on a free
name (``room:chaos-public``) fed by REST broadcasts through any node,
postgres_changes listeners of a table with RLS fed by an app's inserts, and
orgs spread over two tenant databases and moved between them, and every
kind of fault (tenant databases terminated and moves included) injected at
least once.  Every invariant must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.hubs import ROOT

DURATION = 40


def test_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    command = [
        sys.executable,
        "-m",
        "loadtest.chaos",
        "--seed",
        "11",
        "--duration",
        str(DURATION),
        "--nodes",
        "2",
        "--orgs",
        "6",
        "--subscribers",
        "3",
        "--rate",
        "50",
        "--fault-interval",
        "2.5",
        "--json",
        str(report_path),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=DURATION + 120,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["ok"], output
    names = [item["name"] for item in report["invariants"]]
    assert len(names) == 9 and all(item["ok"] for item in report["invariants"]), output
    assert any(name.startswith("public free-name channel") for name in names), names
    assert any(name.startswith("postgres_changes over RLS") for name in names), names
    assert any(name.startswith("database per org") for name in names), names
    # Every kind of fault happened, and the subscribers really resumed.
    for kind in ("kill", "term", "listen", "pubsub", "drop", "move", "tenant"):
        assert report["actions"].get(kind, 0) >= 1, (kind, report["actions"])
    stats = report["stats"]
    assert stats["events"] > 200, stats
    assert stats["moves"] >= 1, stats
    assert stats["reconnects"] > 0 and stats["replayed"] > 0, stats
    # The public free-name channel carried live messages through the faults
    # (none twice, none foreign: the invariant above) to its subscribers.
    assert stats["public_sent"] > 100 and stats["public_received"] > 100, stats
    # Rows of the RLS table reached their members' listeners through them.
    assert stats["rls_written"] > 100 and stats["rls_received"] > 100, stats
    assert "ALL INVARIANTS HOLD" in result.stdout
