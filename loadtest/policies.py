"""Realtime Authorization for the load runs: Supabase-style policies on
``realtime.messages`` and the app table they join, in the database the hub
under load uses (the locust scenarios' ``PrivateRoomUser`` needs them).

As in ``tests/support/policies.py``, written as Supabase's documentation
writes them::

    create table public.rooms_users (user_id uuid, room_topic text, primary key (...));
    -- members of a room may receive on it (both extensions) ...
    create policy ... for select to authenticated using (exists (
      select 1 from public.rooms_users
      where user_id = auth.uid() and room_topic = realtime.topic()));
    -- ... and send broadcasts to it
    create policy ... for insert to authenticated with check (
      realtime.messages.extension = 'broadcast' and exists (...the same...));

Members are deterministic, so the locust workers and this setup agree
without talking: member ``slot`` (0 .. users-1) is the uuid
:func:`member_id` ``(slot)`` and belongs to room :func:`room_topic`
``(prefix, rooms, slot)`` = ``room:<prefix><slot % rooms>``.  Install them
into a migrated database (``hub migrate``) with::

    python -m loadtest.policies postgresql://postgres@127.0.0.1:5432/hub \\
        [--users 100] [--rooms 3] [--room-prefix locust-]

using the same ``--users``/``--rooms``/``--room-prefix`` as the locust run
(``--private-users``, ``--rooms``, ``--room-prefix`` there).  Running it again
replaces the members of that prefix; nothing else in the database changes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import asyncpg

#: uuid5 namespace of the load runs' members.
NAMESPACE = uuid.UUID("6f1d3c52-8c0e-4f4e-9a43-2b1d0c6a7e11")
USERS = 100
ROOMS = 3
ROOM_PREFIX = "locust-"

POLICIES_SQL = """
create table if not exists public.rooms_users (
  user_id uuid not null,
  room_topic text not null,
  primary key (user_id, room_topic)
);
grant select on public.rooms_users to authenticated, anon;
drop policy if exists "load room members read" on realtime.messages;
create policy "load room members read" on realtime.messages
  for select to authenticated using (
    exists (
      select 1 from public.rooms_users
      where user_id = auth.uid() and room_topic = realtime.topic()
    )
  );
drop policy if exists "load room members send" on realtime.messages;
create policy "load room members send" on realtime.messages
  for insert to authenticated with check (
    realtime.messages.extension = 'broadcast'
    and exists (
      select 1 from public.rooms_users
      where user_id = auth.uid() and room_topic = realtime.topic()
    )
  );
"""


def member_id(slot: int) -> str:
    """The ``sub`` (a uuid, as Supabase Auth's) of member ``slot``."""
    return str(uuid.uuid5(NAMESPACE, f"member-{slot}"))


def room_topic(prefix: str, rooms: int, slot: int) -> str:
    """The free channel name (without ``realtime:``) member ``slot`` is in."""
    return f"room:{prefix}{slot % max(1, rooms)}"


async def install(
    dsn: str, *, users: int = USERS, rooms: int = ROOMS, prefix: str = ROOM_PREFIX
) -> None:
    """Create the table and the policies (idempotent) and make members
    0 .. ``users``-1 of their rooms."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(POLICIES_SQL)
        async with conn.transaction():
            await conn.execute(
                "delete from public.rooms_users where room_topic like $1",
                f"room:{prefix.replace('%', '')}%",
            )
            await conn.executemany(
                "insert into public.rooms_users (user_id, room_topic) values ($1, $2)",
                [
                    (uuid.UUID(member_id(slot)), room_topic(prefix, rooms, slot))
                    for slot in range(users)
                ],
            )
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.policies", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dsn", help="the hub's (migrated) database")
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--rooms", type=int, default=ROOMS)
    parser.add_argument("--room-prefix", default=ROOM_PREFIX)
    args = parser.parse_args(argv)
    asyncio.run(install(args.dsn, users=args.users, rooms=args.rooms, prefix=args.room_prefix))
    print(f"policies installed; {args.users} members over {args.rooms} rooms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
