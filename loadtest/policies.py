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

The same setup creates ``public.load_todos``, a table with RLS (each
member selects their own rows; ``secret`` is not granted) in the
publication ``supabase_realtime``: the locust ``TodoUser`` receives its
``postgres_changes``, and ``--write-todos RATE`` writes rows for it.

Members are deterministic, so the locust workers and this setup agree
without talking: member ``slot`` (0 .. users-1) is the uuid
:func:`member_id` ``(slot)`` and belongs to room :func:`room_topic`
``(prefix, rooms, slot)`` = ``room:<prefix><slot % rooms>``.  Install them
into a migrated database (``hub migrate``) with::

    python -m loadtest.policies postgresql://postgres@127.0.0.1:5432/hub \\
        [--users 100] [--rooms 3] [--room-prefix locust-] \\
        [--write-todos 20 --seconds 60]

using the same ``--users``/``--rooms``/``--room-prefix`` as the locust run
(``--private-users``, ``--rooms``, ``--room-prefix`` there).  Running it again
replaces the members of that prefix; nothing else in the database changes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
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

-- postgres_changes over row security: each member's todos are theirs;
-- secret is never granted, so it never leaves the database.
create table if not exists public.load_todos (
  id bigserial primary key,
  user_id uuid not null,
  title text,
  secret text,
  -- When the row was written (Unix seconds): the receivers' latency.
  written_at double precision not null default extract(epoch from clock_timestamp())
);
alter table public.load_todos enable row level security;
grant select (id, user_id, title, written_at) on public.load_todos to authenticated;
drop policy if exists "load todos owner" on public.load_todos;
create policy "load todos owner" on public.load_todos
  for select to authenticated using (user_id = auth.uid());
do $$
begin
  if not exists (select 1 from pg_publication_tables
                 where pubname = 'supabase_realtime' and schemaname = 'public'
                   and tablename = 'load_todos') then
    alter publication supabase_realtime add table public.load_todos;
  end if;
end
$$;
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


async def write_todos(
    dsn: str, *, users: int = USERS, rate: float = 20.0, seconds: float = 60.0
) -> int:
    """Insert ``rate`` todos per second for ``seconds``, each owned by a
    random member (what the ``TodoUser``s of the locust run receive: only
    their own).  Returns how many were written."""
    conn = await asyncpg.connect(dsn, timeout=10)
    written = 0
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < seconds:
            owner = uuid.UUID(member_id(random.randrange(max(1, users))))
            await conn.execute(
                "insert into public.load_todos (user_id, title, secret) values ($1, $2, 'pw')",
                owner,
                f"todo {written}",
            )
            written += 1
            await asyncio.sleep(max(0.0, started + written / rate - loop.time()))
    finally:
        await conn.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.policies", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dsn", help="the hub's (migrated) database")
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--rooms", type=int, default=ROOMS)
    parser.add_argument("--room-prefix", default=ROOM_PREFIX)
    parser.add_argument(
        "--write-todos",
        type=float,
        metavar="RATE",
        help="then insert RATE todos/s into public.load_todos (owners: random members)",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to write todos")
    args = parser.parse_args(argv)
    asyncio.run(install(args.dsn, users=args.users, rooms=args.rooms, prefix=args.room_prefix))
    print(f"policies installed; {args.users} members over {args.rooms} rooms")
    if args.write_todos:
        written = asyncio.run(
            write_todos(args.dsn, users=args.users, rate=args.write_todos, seconds=args.seconds)
        )
        print(f"{written} todos written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
