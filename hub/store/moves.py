"""Moving an org's event log between databases while it is live
(``hub orgs move ORG --to DSN|control``).

What moves: the org's events (every column, ids and timestamps included),
its seq, and where the hub routes it (the registry).  What the app moves:
its own tables (the tracking triggers come with a table tracked in the
target, ``hub track --database DSN``); ``--exec CMD`` runs the app's step
while the org's writes are frozen, before the switch.

The steps, each recorded in ``hub.org_moves`` of the control database so
that a move cut short anywhere (the command killed, a database down) can be
resumed (``--resume``) or rolled back (``--abort``) with nothing lost and
nothing doubled:

1. **copying**: the org's events are copied to the target in chunks, with
   ``COPY``, while it goes on writing to the source.  Nothing in the target
   announces them (no NOTIFY).  The target's progress is its own
   ``max(seq)`` of the org, so a resumed copy goes on where it stopped.
2. **frozen**: ``hub.org_seq.moved_to`` is set in the source.  The UPDATE
   waits for the writers holding the org's seq row to commit; from then on
   ``hub.append_event()`` refuses the org with SQLSTATE ``HB001``.  Hub
   nodes retry such appends against the registry (they are blocked, not
   failed, :mod:`hub.store.federation`); a trigger's write to the source
   fails.  The rest is copied, the copy is checked (same count and last seq
   as the source), ``--exec`` runs, and the target's ``hub.org_seq`` takes
   the org's seq.
3. **switched**: the registry names the target, in the same transaction
   that records the step.  Nodes route the org there within a second (at
   once for a blocked append).  Its next event gets the next seq in the
   target; every node's listeners share the last seq announced, so no
   event is announced twice or skipped.
4. **cleanup**: the org's events, mother rollups and projection
   checkpoints are deleted from the source (its ``hub.org_seq`` row stays,
   with ``moved_to``, so a stray write there keeps failing), and the move's
   row goes.

Writes are blocked from the freeze to the switch: the time to copy what
arrived during the last chunk, plus ``--exec``.  The report says how long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from hub.store.registry import (
    CONTROL,
    RegistryError,
    check_migrated,
    connect,
    display_name,
    identity,
    live_events,
)

#: The advisory lock key hub.project() takes shared per projection
#: (migration 0008; hub.projections.catalog.PROJECTION_LOCK, which a test
#: keeps equal: the store does not import from the layers above it).
PROJECTION_LOCK: Final = 1752523376
#: Events per COPY while copying.
CHUNK: Final = 20_000
#: Events deleted per statement at cleanup.
DELETE_CHUNK: Final = 20_000
#: The tables of the mother's rollups that hold an org column.
MOTHER_TABLES: Final = ("minutes", "hours", "minute_users", "hour_users", "orgs")
_COLUMNS: Final = ["org", "seq", "id", "kind", "type", "payload", "created_at"]


@dataclass(frozen=True, slots=True)
class MoveReport:
    org: str
    source: str
    target: str
    #: The org's last seq, now in the target.
    seq: int
    #: Events copied by this run of the command.
    copied: int
    #: Seconds from the freeze to the switch (writes blocked); None when
    #: this run did not freeze (a resumed move past it).
    frozen_for: float | None


@dataclass(frozen=True, slots=True)
class _Move:
    org: str
    source: str | None  # None: the control database
    target: str | None
    step: str


def _name(dsn: str | None) -> str:
    return CONTROL if dsn is None else display_name(dsn)


async def move(
    control_dsn: str,
    org: str,
    to: str,
    *,
    resume: bool = False,
    exec_cmd: str | None = None,
    say: Callable[[str], None] = print,
) -> MoveReport:
    """Move ``org`` to the database at ``to`` (``control``: the control
    database), or resume the move in progress."""
    target = None if to == CONTROL else to
    async with connect(control_dsn, "control database") as control:
        current = await _current(control, org)
        if current is None:
            if resume:
                raise RegistryError(f"no move of org {org} is in progress")
            current = await _begin(control, control_dsn, org, target)
            say(f"moving org {org} from {_name(current.source)} to {_name(current.target)}")
        elif not resume:
            raise RegistryError(
                f"a move of org {org} to {_name(current.target)} is in progress "
                f"(step {current.step}): finish it with --resume or roll it back with --abort"
            )
        elif current.target != target:
            raise RegistryError(
                f"the move in progress takes org {org} to {_name(current.target)}, not {to}"
            )
        return await _run(control, control_dsn, current, exec_cmd, say)


async def abort(control_dsn: str, org: str, say: Callable[[str], None] = print) -> None:
    """Roll back the move of ``org`` in progress, unless it has switched."""
    async with connect(control_dsn, "control database") as control:
        current = await _current(control, org)
        if current is None:
            raise RegistryError(f"no move of org {org} is in progress")
        if current.step == "switched":
            raise RegistryError(
                f"the move of org {org} has switched to {_name(current.target)}: finish it "
                "with --resume (then move it back if you want it back)"
            )
        async with connect(current.source or control_dsn, "source database") as source:
            await source.execute("UPDATE hub.org_seq SET moved_to = NULL WHERE org = $1", org)
        say(f"org {org} writes again to {_name(current.source)}")
        try:
            async with connect(current.target or control_dsn, "target database") as tgt:
                await _forget(tgt, org, keep_seq=False)
            say(f"the copies in {_name(current.target)} are deleted")
        except RegistryError as exc:
            say(f"{exc}; the copies left there are replaced by the next move there")
        await control.execute("DELETE FROM hub.org_moves WHERE org = $1", org)


async def _current(control: asyncpg.Connection, org: str) -> _Move | None:
    row = await control.fetchrow(
        "SELECT org, source, target, step FROM hub.org_moves WHERE org = $1", org
    )
    if row is None:
        return None
    return _Move(row["org"], row["source"], row["target"], row["step"])


async def _begin(
    control: asyncpg.Connection, control_dsn: str, org: str, target: str | None
) -> _Move:
    """Check everything, then record the move (its row refuses a second)."""
    source = await control.fetchval("SELECT dsn FROM hub.org_databases WHERE org = $1", org)
    async with (
        connect(source or control_dsn, "source database") as src,
        connect(target or control_dsn, "target database") as tgt,
    ):
        if await identity(src) == await identity(tgt):
            raise RegistryError(f"org {org} already lives in {_name(target)}")
        await check_migrated(tgt, target or control_dsn)
        if not await live_events(src, org):
            raise RegistryError(
                f"org {org} has no events in {_name(source)}: there is nothing to move "
                "(an org without events is placed with `hub orgs add`)"
            )
        if seq := await live_events(tgt, org):
            raise RegistryError(f"{_name(target)} already holds {seq} events of org {org}")
        # Leftovers of an earlier move there that was rolled back.
        await _forget(tgt, org, keep_seq=False)
    try:
        await control.execute(
            "INSERT INTO hub.org_moves (org, source, target, step) VALUES ($1, $2, $3, 'copying')",
            org,
            source,
            target,
        )
    except asyncpg.UniqueViolationError:
        raise RegistryError(f"another move of org {org} has just started") from None
    return _Move(org, source, target, "copying")


async def _run(
    control: asyncpg.Connection,
    control_dsn: str,
    m: _Move,
    exec_cmd: str | None,
    say: Callable[[str], None],
) -> MoveReport:
    copied = 0
    frozen_for: float | None = None
    async with (
        connect(m.source or control_dsn, "source database") as src,
        connect(m.target or control_dsn, "target database") as tgt,
    ):
        step = m.step
        if step == "copying":
            copied += await _copy(src, tgt, m.org, say)
            frozen_at = time.monotonic()
            # Waits for the writers that hold the org's seq row.
            frozen = await src.fetchval(
                "UPDATE hub.org_seq SET moved_to = $2 WHERE org = $1 RETURNING seq",
                m.org,
                _name(m.target),
            )
            if frozen is None:
                raise RegistryError(f"org {m.org} has no seq in {_name(m.source)}")
            await _step(control, m.org, "frozen")
            say(f"writes of org {m.org} frozen at seq {frozen}")
            step = "frozen"
        else:
            frozen_at = time.monotonic()
        if step == "frozen":
            copied += await _copy(src, tgt, m.org, say)
            seq = await _check_copy(src, tgt, m)
            if exec_cmd is not None:
                await _exec(exec_cmd, m)
            await tgt.execute(
                "INSERT INTO hub.org_seq (org, seq) VALUES ($1, $2) ON CONFLICT (org) "
                "DO UPDATE SET seq = excluded.seq, moved_to = NULL",
                m.org,
                seq,
            )
            async with control.transaction():
                if m.target is None:
                    await control.execute("DELETE FROM hub.org_databases WHERE org = $1", m.org)
                else:
                    await control.execute(
                        "INSERT INTO hub.org_databases (org, dsn) VALUES ($1, $2) "
                        "ON CONFLICT (org) DO UPDATE SET dsn = excluded.dsn, added_at = now()",
                        m.org,
                        m.target,
                    )
                await _step(control, m.org, "switched")
            frozen_for = time.monotonic() - frozen_at if m.step == "copying" else None
            say(f"org {m.org} lives in {_name(m.target)} from seq {seq + 1} on")
        seq = await live_events(tgt, m.org)
        await _forget(src, m.org, keep_seq=True)
        await control.execute("DELETE FROM hub.org_moves WHERE org = $1", m.org)
        say(f"org {m.org}'s events are deleted from {_name(m.source)}")
    return MoveReport(m.org, _name(m.source), _name(m.target), seq, copied, frozen_for)


async def _step(control: asyncpg.Connection, org: str, step: str) -> None:
    column = {"frozen": "frozen_at", "switched": "switched_at"}[step]
    await control.execute(
        f"UPDATE hub.org_moves SET step = $2, {column} = now() WHERE org = $1", org, step
    )


async def _copy(
    src: asyncpg.Connection, tgt: asyncpg.Connection, org: str, say: Callable[[str], None]
) -> int:
    """Copy the org's events the target lacks (after its own max seq)."""
    after = int(
        await tgt.fetchval("SELECT coalesce(max(seq), 0) FROM hub.events WHERE org = $1", org)
    )
    # The days to come get their partitions first, so rows go to them and
    # not through the default partition.
    days: list[dt.date] = await src.fetchval(
        "SELECT coalesce(array_agg(DISTINCT (created_at AT TIME ZONE 'UTC')::date), '{}') "
        "FROM hub.events WHERE org = $1 AND seq > $2",
        org,
        after,
    )
    if days:
        await tgt.fetch("SELECT hub.ensure_event_partitions(3, $1::date[])", days)
    copied = 0
    while True:
        rows = await src.fetch(
            "SELECT org, seq, id, kind, type, payload::text AS payload, created_at "
            "FROM hub.events WHERE org = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            org,
            after,
            CHUNK,
        )
        if not rows:
            return copied
        await tgt.copy_records_to_table(
            "events", schema_name="hub", columns=_COLUMNS, records=[tuple(r) for r in rows]
        )
        copied += len(rows)
        after = rows[-1]["seq"]
        if len(rows) == CHUNK:
            say(f"copied {copied} events (up to seq {after})")


async def _check_copy(src: asyncpg.Connection, tgt: asyncpg.Connection, m: _Move) -> int:
    """The org's seq, once the target holds exactly what the source holds."""
    query = "SELECT count(*) AS n, coalesce(max(seq), 0) AS last FROM hub.events WHERE org = $1"
    have, got = await src.fetchrow(query, m.org), await tgt.fetchrow(query, m.org)
    seq = int(await src.fetchval("SELECT seq FROM hub.org_seq WHERE org = $1", m.org))
    if (have["n"], have["last"]) != (got["n"], got["last"]) or got["last"] > seq:
        raise RegistryError(
            f"the copy of org {m.org} does not match: {have['n']} events up to seq "
            f"{have['last']} in {_name(m.source)}, {got['n']} up to {got['last']} in "
            f"{_name(m.target)}; nothing was switched (--abort, then move again)"
        )
    return seq


async def _exec(command: str, m: _Move) -> None:
    """The app's step while writes are frozen; a failure stops the move
    before the switch (resume or abort it)."""
    env = {
        **os.environ,
        "HUB_MOVE_ORG": m.org,
        "HUB_MOVE_SOURCE": m.source or CONTROL,
        "HUB_MOVE_TARGET": m.target or CONTROL,
    }
    proc = await asyncio.create_subprocess_shell(command, env=env)
    if await proc.wait() != 0:
        raise RegistryError(
            f"--exec exited with {proc.returncode}: org {m.org} stays frozen in "
            f"{_name(m.source)}; --resume to try again, or --abort"
        )


async def _forget(conn: asyncpg.Connection, org: str, *, keep_seq: bool) -> None:
    """Delete the org's events, rollups and checkpoints from a database it
    does not live in; ``keep_seq`` keeps its frozen seq row."""
    async with conn.transaction():
        # A projection batch that took the org before it was frozen commits
        # first (hub.project() holds these locks shared); later batches
        # leave it out (hub.projection_lag skips a moved org).
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(name)) FROM hub.projections ORDER BY name",
            PROJECTION_LOCK,
        )
        await conn.execute("DELETE FROM hub.projection_checkpoints WHERE org = $1", org)
        for table in MOTHER_TABLES:
            await conn.execute(f"DELETE FROM mother.{table} WHERE org = $1", org)
    while (
        await conn.execute(
            "DELETE FROM hub.events WHERE (org, seq) IN (SELECT org, seq FROM hub.events "
            "WHERE org = $1 LIMIT $2)",
            org,
            DELETE_CHUNK,
        )
        != "DELETE 0"
    ):
        pass
    if not keep_seq:
        await conn.execute("DELETE FROM hub.org_seq WHERE org = $1", org)
