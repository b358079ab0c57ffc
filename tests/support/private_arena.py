"""The hostile-input arena of private channels (Realtime Authorization).

A :class:`PrivateArena` is tests/support/arena.py's arena moved to a free
channel name guarded by the app's own policies: a *victim* user owns the
private channel ``vault:<random>`` (only the victim may read it, and write it
with an ``aal2`` token).  The victim has a subscriber and a publisher joined
to it; the publisher keeps broadcasting the victim's marker over the socket
and the app keeps sending it from SQL (``select realtime.send(...)``, private).
Two spies (an ``anon`` and an ``authenticated`` attacker) sit on the
*public* channel of the same name from the start.

When a test ends the arena checks, whatever the test did, that

* the hub is alive, logged no traceback and still serves a public join,
* the victim's private channel was live (it heard the socket broadcasts and
  a ``realtime.send`` made after the attacks),
* nothing carrying the attacker's marker reached a victim connection, and
* nothing carrying the victim's marker reached an attacker connection (from
  the moment it became one, for a connection that lost its access) or an
  HTTP response an attacker got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from tests.support.arena import V1, V2, Conn, T
from tests.support.hubs import HubProcess

#: Policies written as in Supabase's documentation.  The owner check
#: compares text (``auth.uid()`` casts ``sub`` to uuid and would make every
#: check of a token with another ``sub`` raise instead of deny).
POLICIES = """
create table public.vault_owners (user_id text not null, topic text not null);
grant select on public.vault_owners to authenticated, anon;

-- vault:* and lobby:* owners read their channels (both extensions).
create policy "owners read" on realtime.messages
  for select to authenticated using (
    exists (
      select 1 from public.vault_owners o
      where o.user_id = current_setting('request.jwt.claim.sub', true)
        and o.topic = realtime.topic()
    )
  );
-- Owners write (broadcast and presence) with a second factor only.
create policy "owners write with aal2" on realtime.messages
  for insert to authenticated with check (
    exists (
      select 1 from public.vault_owners o
      where o.user_id = current_setting('request.jwt.claim.sub', true)
        and o.topic = realtime.topic()
    )
    and coalesce(auth.jwt() ->> 'aal', '') = 'aal2'
  );
-- Anyone signed in reads a lobby (presence included), only owners write.
create policy "lobby read" on realtime.messages
  for select to authenticated using (realtime.topic() like 'lobby:%');
-- news:* broadcasts may be read by anyone signed in (not presence);
-- pres:* presence may be read by anyone signed in (not broadcasts).
create policy "news broadcast read" on realtime.messages
  for select to authenticated using (
    realtime.topic() like 'news:%' and realtime.messages.extension = 'broadcast'
  );
create policy "pres presence read" on realtime.messages
  for select to authenticated using (
    realtime.topic() like 'pres:%' and realtime.messages.extension = 'presence'
  );
-- Staff topics: a policy on the token's email claim.
create policy "staff read" on realtime.messages
  for select to authenticated using (
    realtime.topic() like 'staff:%'
    and (current_setting('request.jwt.claims', true)::jsonb ->> 'email') like '%@victim.example'
  );
"""


def private(presence: bool = True, ack: bool = False) -> dict[str, Any]:
    return {
        "broadcast": {"self": False, "ack": ack},
        "presence": {"enabled": presence},
        "private": True,
    }


PUBLIC: dict[str, Any] = {"broadcast": {"self": False}, "private": False}


@dataclass
class PrivateArena:
    hub: HubProcess
    dsn: str
    #: Whether the app keeps sending the victim's marker from SQL.
    sql: bool = True
    #: Whether the hub may log a traceback during this test.
    traceback_ok: bool = False
    mark: str = field(default_factory=lambda: secrets.token_hex(6))
    victim_sub: str = field(default_factory=lambda: str(uuid.uuid4()))
    attacker_sub: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = field(default_factory=lambda: "vault:" + secrets.token_hex(5))
    attackers: list[tuple[Conn, int]] = field(default_factory=list)
    victims: list[Conn] = field(default_factory=list)
    responses: list[httpx.Response] = field(default_factory=list)
    #: Connections checked by nobody, closed at the end.
    others: list[Conn] = field(default_factory=list)
    sql_sent: int = 0
    sql_failed: int = 0

    @property
    def topic(self) -> str:
        return "realtime:" + self.name

    @property
    def victim_marker(self) -> str:
        return f"VICTIM-{self.mark}"

    @property
    def attacker_marker(self) -> str:
        return f"ATTACKER-{self.mark}"

    # -- tokens ------------------------------------------------------------

    def token(self, sub: str | None, **claims: Any) -> str:
        role = claims.pop("role", "authenticated")
        ttl = claims.pop("ttl", 3600)
        return self.hub.token(sub=sub, orgs=[], role=role, ttl=ttl, **claims)

    def victim_token(self, **claims: Any) -> str:
        return self.token(self.victim_sub, **{"aal": "aal2", **claims})

    def attacker_token(self, **claims: Any) -> str:
        return self.token(self.attacker_sub, **{"aal": "aal2", **claims})

    # -- the database --------------------------------------------------------

    async def execute(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.dsn, timeout=T)
        try:
            return await conn.fetch(sql, *args, timeout=T)
        finally:
            await conn.close()

    async def own(self, topic_name: str, sub: str | None = None) -> None:
        """Make ``sub`` (the victim) an owner of ``topic_name``."""
        await self.execute(
            "insert into public.vault_owners values ($1, $2)", sub or self.victim_sub, topic_name
        )

    async def sql_send(
        self, payload: dict[str, Any], topic_name: str | None = None, private: bool = True
    ) -> None:
        await self.execute(
            "select realtime.send($1::jsonb, 'sql', $2, $3)",
            json.dumps(payload),
            topic_name or self.name,
            private,
        )

    # -- connections ----------------------------------------------------------

    async def attacker(self, token: str | None = None, vsn: str = V1) -> Conn:
        conn = await Conn.open(
            self.hub, token or self.attacker_token(), vsn, f"atk{len(self.attackers)}-"
        )
        conn.marker = self.attacker_marker
        self.attackers.append((conn, 0))
        return conn

    def turned(self, conn: Conn) -> None:
        """``conn`` lost its access: from now on it must hear nothing of the
        victim (what it heard before was its right)."""
        conn.marker = self.attacker_marker
        self.attackers.append((conn, len(conn.raw)))

    async def victim_conn(self, token: str | None = None, vsn: str = V2) -> Conn:
        """Another connection of the victim, which must never hear the
        attacker's marker."""
        conn = await Conn.open(
            self.hub, token or self.victim_token(), vsn, f"v{len(self.victims)}-"
        )
        conn.marker = f"INSIDER-{self.mark}"
        self.victims.append(conn)
        return conn

    async def http(self, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.hub.http_url, timeout=T) as http:
            response = await http.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
        self.responses.append(response)
        return response

    # -- the run ----------------------------------------------------------------

    async def start(self) -> None:
        await self.own(self.name)
        self.victim = await self.victim_conn(vsn=V2)
        self.publisher = await self.victim_conn(vsn=V1)
        for conn in (self.victim, self.publisher):
            join_ref, reply = await conn.join(self.topic, private())
            assert reply["status"] == "ok", reply
            conn.client.join_refs[self.topic] = join_ref
        self.spies = [
            await self.attacker(self.token(None, role="anon"), V1),
            await self.attacker(vsn=V2),
        ]
        for spy in self.spies:
            join_ref, reply = await spy.join(self.topic, PUBLIC)
            assert reply["status"] == "ok", reply
            spy.client.join_refs[self.topic] = join_ref
        self._stopping = False
        self._publishing = asyncio.create_task(self._publish())
        # The private channel carries both kinds of the victim's traffic
        # before any attack starts.
        await self.victim.wait_for(lambda m: self._victims(m, "msg"))
        if self.sql:
            await self.victim.wait_for(lambda m: self._victims(m, "sql"))

    def _victims(self, message: Any, event: str) -> bool:
        return message.user_event == event and self.victim_marker in json.dumps(message.payload)

    async def _publish(self) -> None:
        n = 0
        join_ref = self.publisher.client.join_refs.get(self.topic)
        while not self._stopping:
            n += 1
            with contextlib.suppress(Exception):
                await self.publisher.broadcast(
                    self.topic, join_ref, {"m": self.victim_marker, "n": n}
                )
            if self.sql and n % 10 == 1:
                try:
                    await self.sql_send({"m": self.victim_marker, "n": n})
                    self.sql_sent += 1
                except (OSError, asyncpg.PostgresError, TimeoutError):
                    self.sql_failed += 1  # the database is down: the test's doing
            await asyncio.sleep(0.05)

    async def stop_publishing(self) -> None:
        self._stopping = True
        await asyncio.wait_for(self._publishing, 2 * T)

    async def quiet(self, within: float = 0.5) -> None:
        """Let the victim's traffic flow while the attackers listen."""
        await asyncio.sleep(within)

    async def all_conns(self) -> list[Conn]:
        return [*self.victims, *(conn for conn, _ in self.attackers), *self.others]

    async def finish(self) -> None:
        await asyncio.sleep(0.2)  # let in-flight frames land
        await self.stop_publishing()
        assert self.hub.process.poll() is None, "the hub died"
        # The private channel is live: a socket broadcast and a database
        # broadcast sent now both reach the victim.
        seen = len(self.victim.messages)
        join_ref = self.publisher.client.join_refs[self.topic]
        await self.publisher.broadcast(self.topic, join_ref, {"m": self.victim_marker, "end": 1})
        await self.victim.client.wait_for(
            lambda m: self._victims(m, "msg") and m.body.get("end") == 1, since=seen, within=T
        )
        if self.sql:
            await self.sql_send({"m": self.victim_marker, "end": 2})
            await self.victim.client.wait_for(
                lambda m: self._victims(m, "sql") and m.body.get("end") == 2, since=seen, within=T
            )
        await self.victim.heartbeat()
        # The hub still serves public joins.
        probe = await Conn.open(self.hub, self.token(None, role="anon"), V2, "probe-")
        _, reply = await probe.join("realtime:probe:" + self.mark, PUBLIC)
        assert reply["status"] == "ok", reply
        await probe.close()
        for victim in self.victims:
            assert self.attacker_marker not in victim.text(), (
                f"attacker traffic reached the victim {victim.label}: {victim.messages[-5:]!r}"
            )
        for conn, since in self.attackers:
            heard = "\n".join(
                item if isinstance(item, str) else item.decode(errors="replace")
                for item in conn.raw[since:]
            )
            assert self.victim_marker not in heard, (
                f"victim traffic reached attacker {conn.label}: {conn.messages[-5:]!r}"
            )
        for response in self.responses:
            assert self.victim_marker not in response.text, (
                f"{response.request.url} revealed victim data: {response.text[:300]}"
            )

    async def close_all(self) -> None:
        await asyncio.gather(*(c.close() for c in await self.all_conns()))


@contextlib.asynccontextmanager
async def private_arena(
    hub: HubProcess, dsn: str, *, sql: bool = True, traceback_ok: bool = False
) -> AsyncIterator[PrivateArena]:
    arena = PrivateArena(hub, dsn, sql=sql, traceback_ok=traceback_ok)
    start = len(hub.log())
    await arena.start()
    try:
        yield arena
        await arena.finish()
    finally:
        with contextlib.suppress(Exception):
            await arena.stop_publishing()
        await arena.close_all()
    if not traceback_ok:
        new_log = hub.log()[start:]
        assert "Traceback" not in new_log, new_log


async def refused(conn: Conn, topic: str, config: dict[str, Any], **kwargs: Any) -> str:
    """Join expecting an error reply; returns the reason.  A join wrongly
    accepted publishes the attacker's marker at once, for the arena to see."""
    join_ref, reply = await conn.join(topic, config, **kwargs)
    if reply["status"] == "ok":
        await conn.broadcast(topic, join_ref, {"m": conn.marker})
    assert reply["status"] == "error", f"join of {topic[:80]!r} with {config} accepted: {reply}"
    return str(reply["response"].get("reason", ""))


__all__ = ["POLICIES", "PUBLIC", "V1", "V2", "PrivateArena", "private", "private_arena", "refused"]
