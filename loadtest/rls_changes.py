"""Changes per second of postgres_changes over an RLS table, with many
subscribers (issue 12, item 5).

Starts a `hub serve` on a fresh database, creates ``public.bench_todos``
(RLS: each user selects their own rows; ``secret`` not granted), adds it to
the publication ``supabase_realtime``, joins SUBSCRIBERS channels on free
names (SOCKETS sockets, each channel with the token of one of USERS users
via the join's ``access_token``), inserts CHANGES rows (each owned by one
user) and waits until every row reached its owner's channels.  Prints the
figure: changes per second, end to end (insert to the last delivery).

    python -m loadtest.rls_changes [--subscribers 1000]
        [--users 1000] [--changes 300] [--sockets 20]

Every change costs one ``hub.rls_visible()`` call checking all distinct
(role, claims) contexts: USERS contexts when every subscriber's user
differs (the worst case), fewer when users have several tabs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from hub.client.realtime import AsyncClient
from hub.store.migrate import migrate
from tests.support.hubs import start_hub, stop_hub
from tests.support.pg import create_database, drop_database, new_database_name

SCHEMA = """
CREATE TABLE public.bench_todos (id bigserial PRIMARY KEY, user_id uuid NOT NULL,
                                 title text, secret text);
ALTER TABLE public.bench_todos ENABLE ROW LEVEL SECURITY;
GRANT SELECT (id, user_id, title) ON public.bench_todos TO authenticated;
CREATE POLICY own ON public.bench_todos FOR SELECT TO authenticated
  USING (user_id = auth.uid());
ALTER PUBLICATION supabase_realtime ADD TABLE public.bench_todos;
"""


async def main(args: argparse.Namespace) -> None:
    name = new_database_name()
    dsn = await create_database(name)
    hub = None
    clients: list[AsyncClient] = []
    try:
        await migrate(dsn)
        db = await asyncpg.connect(dsn)
        await db.execute(SCHEMA)
        hub = await asyncio.to_thread(
            start_hub,
            Path(tempfile.mkdtemp(prefix="rls-bench-")),
            # The bench joins many channels per socket at once.
            {"HUB_DATABASE_URL": dsn, "HUB_JOINS_PER_SECOND": "1000", "HUB_JOIN_BURST": "1000"},
        )
        # The hub follows the publication about once a second.
        for _ in range(100):
            if await db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'hub_capture_publication' "
                "AND tgrelid = 'public.bench_todos'::regclass)"
            ):
                break
            await asyncio.sleep(0.1)
        users = [str(uuid.uuid4()) for _ in range(args.users)]
        tokens = [hub.token(sub=user, orgs=[]) for user in users]
        per_socket = -(-args.subscribers // args.sockets)
        config = {
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "bench_todos"}]
        }
        owner_channels: dict[str, int] = {}
        for s in range(args.sockets):
            client = await AsyncClient.connect(hub.ws_url, tokens[0], "1.0.0", within=30)
            clients.append(client)
            for c in range(per_socket):
                i = s * per_socket + c
                if i >= args.subscribers:
                    break
                user = i % args.users
                await client.join(f"realtime:bench-{c}", config, access_token=tokens[user])
                owner_channels[users[user]] = owner_channels.get(users[user], 0) + 1
        owners = [users[i % args.users] for i in range(args.changes)]
        expected = sum(owner_channels.get(owner, 0) for owner in owners)

        def received() -> int:
            return sum(
                1 for client in clients for m in client.messages if m.event == "postgres_changes"
            )

        started = time.monotonic()
        await db.executemany(
            "INSERT INTO public.bench_todos (user_id, title, secret) VALUES ($1, 'x', 'pw')",
            [(uuid.UUID(owner),) for owner in owners],
        )
        inserted = time.monotonic() - started
        got = 0
        for _ in range(12_000):  # 600 s at most
            got = received()
            if got >= expected:
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        await db.close()
        print(
            f"{args.subscribers} subscribers ({args.users} distinct users, {args.sockets} "
            f"sockets), {args.changes} INSERTs on an RLS table (inserted in {inserted:.2f} s): "
            f"{got}/{expected} deliveries in {elapsed:.2f} s = "
            f"{args.changes / elapsed:.1f} changes/s"
        )
    finally:
        for client in clients:
            await client.close()
        if hub is not None:
            stop_hub(hub)
        await drop_database(name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--sockets", type=int, default=20)
    asyncio.run(main(parser.parse_args()))
