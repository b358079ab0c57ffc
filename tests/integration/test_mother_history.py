"""The mother's history in SQL (issue 14): the rollups that the projection
``mother`` keeps agree exactly with the live counters for the same events,
``GET /api/mother/history`` reads them (JSON and CSV), and after a restart
the history is there at once.  Real `hub serve`, real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import asyncpg
import httpx

from tests.support.hubs import HubProcess
from tests.support.mother import StartHub, new_org, publish
from tests.support.projections import caught_up

T = 30.0


async def get(hub: HubProcess, path: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        return await http.get(
            path, params=params, headers={"Authorization": f"Bearer {hub.admin_token()}"}
        )


async def test_live_counters_and_rollups_agree_and_history_survives_a_restart(
    fresh_dsn: str, mother_hub: StartHub
) -> None:
    hub = mother_hub({"HUB_DATABASE_URL": fresh_dsn})
    orgs = [new_org() for _ in range(3)]
    for n, org in enumerate(orgs):
        await publish(
            hub,
            org,
            [(f"type{i % 3}", {"user_id": f"u{i % (n + 2)}", "i": i}) for i in range(20 + 7 * n)],
        )
    db = await asyncpg.connect(fresh_dsn)
    try:
        await caught_up(db, "mother", within=T)
        # The live counters (GET /api/mother/stats: per org, the last hour per
        # minute, newest last) and mother.org_activity, minute by minute.
        snapshot = (await get(hub, "/api/mother/stats")).json()
        minute_now = int(snapshot["time"] // 60)
        rows = await db.fetch(
            "SELECT org, extract(epoch FROM minute)::bigint / 60 AS m, sum(events)::bigint AS n "
            "FROM mother.org_activity GROUP BY 1, 2"
        )
        sql: dict[str, dict[int, int]] = {}
        for row in rows:
            sql.setdefault(row["org"], {})[int(row["m"])] = int(row["n"])
        live = {
            item["org"]: {
                minute_now - 59 + i: count for i, count in enumerate(item["per_minute"]) if count
            }
            for item in snapshot["orgs"]
        }
        assert live == sql
        assert {org: sum(v.values()) for org, v in sql.items()} == {
            orgs[0]: 20,
            orgs[1]: 27,
            orgs[2]: 34,
        }

        day = (await get(hub, "/api/mother/history", range="24h", org=orgs[1])).json()
        assert day["source"] == "sql" and day["events"] == 81
        assert sum(day["org"]["series"]) == 27
        assert {o["org"]: (o["events"], o["users"]) for o in day["orgs"]} == {
            orgs[0]: (20, 2),
            orgs[1]: (27, 3),
            orgs[2]: (34, 4),
        }
        exported = (await get(hub, "/api/mother/history", range="7d", format="csv")).text
        table = list(csv.DictReader(io.StringIO(exported)))
        summary = {
            r["org"]: r
            for r in await db.fetch(
                "SELECT s.org, s.events, to_char(s.last_event_at AT TIME ZONE 'UTC', "
                '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\') AS last FROM mother.org_summary s'
            )
        }
        assert [(r["org"], int(r["events"]), r["last_event_at"]) for r in table] == [
            (org, summary[org]["events"], summary[org]["last"]) for org in reversed(orgs)
        ]
        assert (await get(hub, "/api/mother/history", range="1y")).status_code == 422
        assert (await get(hub, "/api/mother/history", format="xml")).status_code == 422
        async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
            member = hub.token(sub="m", orgs=[orgs[0]])
            refused = await http.get(
                "/api/mother/history", headers={"Authorization": f"Bearer {member}"}
            )
            assert refused.status_code == 403

        # The projections' state: the mother caught up; a projection whose
        # handler raises is listed as stopped, with its org, seq and error.
        await db.execute(
            "CREATE SCHEMA broken_rm; CREATE SCHEMA broken_app; "
            "CREATE FUNCTION broken_app.fail(e hub.events) RETURNS void LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'cannot fold %', e.type; END $$; "
            "SELECT hub.register_projection('broken', 'broken_app.fail(hub.events)', "
            "NULL, 'broken_rm')"
        )
        deadline = time.monotonic() + T
        while True:
            state = (await get(hub, "/api/mother/projections")).json()
            if len(state["stopped"]) == 3:
                break
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.1)
        by_name = {p["name"]: p for p in state["projections"]}
        assert by_name["mother"]["lag"] == 0 and by_name["mother"]["stopped"] == 0
        assert by_name["broken"]["stopped"] == 3 and by_name["broken"]["behind"] == 3
        assert {(s["org"], s["error_seq"], s["error"]) for s in state["stopped"]} == {
            (org, 1, "cannot fold type0") for org in orgs
        }
        # The leader exports them at its next turn.
        deadline = time.monotonic() + T
        while True:
            try:
                if hub.metric("hub_projection_stopped") == 3:
                    break
            except KeyError:
                pass  # no stopped series yet
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

        # Another node started from nothing has the same history at once.
        other = mother_hub({"HUB_DATABASE_URL": fresh_dsn})
        again = (await get(other, "/api/mother/history", range="24h", org=orgs[1])).json()
        assert again["orgs"] == day["orgs"] and again["org"] == day["org"]
    finally:
        await db.close()


async def test_embedded_history_counts_what_the_node_sees(mother_hub: StartHub) -> None:
    hub = mother_hub()
    org = new_org()
    await publish(hub, org, [("t", {"user_id": "a"}), ("t", {"user_id": "b"}), ("t", {})])
    deadline = time.monotonic() + T
    while True:
        view: dict[str, Any] = (await get(hub, "/api/mother/history", range="30d")).json()
        if view["events"] == 3:
            break
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.05)
    assert view["source"] == "memory"
    assert [(o["org"], o["events"], o["users"]) for o in view["orgs"]] == [(org, 3, 2)]
    assert (await get(hub, "/api/mother/projections")).json() == {
        "projections": None,
        "stopped": [],
    }
