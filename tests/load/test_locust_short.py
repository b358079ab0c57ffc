"""A short headless locust run against a real hub: every scenario of
``loadtest/locustfile.py`` runs for about 20 s; no request may fail, the
members must receive broadcasts and durable events, the users of public and
of private free-name rooms must join, publish and receive (the private ones
authorized by the Supabase-style policies of ``loadtest/policies.py``, in the
hub's own fresh database, as the soak run sets it up), the todo users must
receive postgres_changes of their own rows only (a table with RLS, written
while locust runs), and locust must write its CSV and HTML reports."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.store.migrate import migrate
from loadtest import policies
from tests.support.hubs import ROOT
from tests.support.pg import create_database, drop_database, new_database_name, run_sync

RUN_SECONDS = 20
#: Todos written per second (owners among policies.USERS members).
TODO_RATE = 50.0


def _stats(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


@pytest.fixture
def policy_dsn() -> Iterator[str]:
    """A fresh migrated database with the private rooms' policies and
    members (loadtest/policies.py's defaults, as the locust run uses them)."""
    name = new_database_name()

    async def setup() -> str:
        dsn = await create_database(name)
        await migrate(dsn)
        await policies.install(dsn, rooms=1)
        return dsn

    try:
        yield run_sync(setup)
    finally:
        run_sync(lambda: drop_database(name))


def test_locust_headless_run(make_hub: Any, policy_dsn: str, tmp_path: Path) -> None:
    hub = make_hub({"HUB_LOG_LEVEL": "warning", "HUB_DATABASE_URL": policy_dsn})
    # The todo users' rows: written for the whole run, owned by random members.
    writer = threading.Thread(
        target=lambda: asyncio.run(
            policies.write_todos(policy_dsn, rate=TODO_RATE, seconds=RUN_SECONDS)
        ),
        daemon=True,
    )
    writer.start()
    out = tmp_path / "out"
    locust = Path(sys.executable).with_name("locust")
    command = [
        str(locust),
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "-u",
        "24",
        "-r",
        "12",
        "-t",
        f"{RUN_SECONDS}s",
        "--host",
        hub.http_url,
        "--csv",
        str(out),
        "--html",
        str(tmp_path / "out.html"),
        "--only-summary",
        "--orgs",
        "3",
        "--publish-rate",
        "2",
        "--rest-rate",
        "4",
        # One room: the public and the private users share its name (two
        # channels that must never exchange a message), and each kind has
        # at least two users to hear each other.
        "--rooms",
        "1",
        "--public-weight",
        "3",
        "--private-weight",
        "3",
        "--todo-weight",
        "3",
    ]
    env = {**os.environ, "HUB_JWT_SECRET": hub.secret, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS + 60,
    )
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, report

    stats = _stats(Path(f"{out}_stats.csv"))
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, report
    for name in ("join", "presence track", "publish (ack)", "broadcast latency", "durable latency"):
        row = stats.get(("WS", name))
        assert row is not None and int(row["Request Count"]) > 0, (name, report)
    for name in ("churn join", "join mother"):
        assert int(stats[("WS", name)]["Request Count"]) > 0, (name, report)
    assert int(stats[("POST", "POST /api/orgs/[org]/events")]["Request Count"]) > 0
    # Every member receives the others' broadcasts: far more receipts than publishes.
    received = int(stats[("WS", "broadcast latency")]["Request Count"])
    assert received > int(stats[("WS", "publish (ack)")]["Request Count"])
    assert float(stats[("WS", "broadcast latency")]["99%"]) < 1000, report
    # Public and private free-name rooms: joined, published (acked, so the
    # private users' write policy allowed it), and received by the others of
    # their kind; a message of the other kind would be a failure (counted
    # above, and named here).
    for kind in ("public", "private"):
        for name in (f"{kind} join", f"{kind} publish (ack)", f"{kind} broadcast latency"):
            row = stats.get(("WS", name))
            assert row is not None and int(row["Request Count"]) > 0, (name, report)
            assert int(row["Failure Count"]) == 0, (name, report)
        assert float(stats[("WS", f"{kind} broadcast latency")]["99%"]) < 1000, report
    assert int(stats[("WS", "public presence track")]["Request Count"]) > 0, report
    assert ("WS", "public/private mix") not in stats, report
    # postgres_changes over RLS: each todo user got rows, only its own.
    assert int(stats[("WS", "todo join")]["Request Count"]) > 0, report
    assert int(stats[("WS", "rls change latency")]["Request Count"]) > 0, report
    assert ("WS", "rls leak") not in stats, report
    writer.join(timeout=10)

    with Path(f"{out}_failures.csv").open() as handle:
        assert len(handle.read().strip().splitlines()) == 1  # header only
    html = (tmp_path / "out.html").read_text()
    assert "broadcast latency" in html
    assert "Traceback" not in hub.log()
