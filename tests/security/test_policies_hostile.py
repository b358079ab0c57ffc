"""Hostile input against private channels and Realtime Authorization.

Against a real `hub serve` whose ``HUB_DATABASE_URL`` is a real PostgreSQL
database migrated by `hub migrate`, with the app's own policies on
``realtime.messages`` (tests/support/private_arena.py: only the victim may
read ``vault:<x>``, and write it with an ``aal2`` token).  Three surfaces:

* public/private confusion: the public channel of a private channel's
  name, ``private`` spelled every way, rejoins that switch kind under one
  join_ref, REST broadcast with ``private`` variants;
* policy bypass: forged and foreign roles, claims a policy reads, claims
  that are not JSON-safe, SQL-looking topics, topics at and past 246 bytes,
  a token swapped mid-channel, presence without write, frames before a
  join, replay;
* bad database states: a policy that raises, no partition for today, the
  database down at join time.  Each gets an error reply, leaks nothing and
  the hub keeps serving.

Every case runs in a :class:`PrivateArena`, which checks at the end that no
marker crossed in either direction and that the victim's channel was live.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hub.client.realtime import encode_kind3
from tests.support.arena import V1, V2, Conn, b64url, forge, handshake_status, hs256
from tests.support.hubs import HubProcess, start_hub, stop_hub
from tests.support.pg import create_database, drop_database, new_database_name, run_sync
from tests.support.pgserver import PgServer
from tests.support.private_arena import (
    POLICIES,
    PUBLIC,
    PrivateArena,
    private,
    private_arena,
    refused,
)

UNAUTHORIZED_READ = "Unauthorized: You do not have permissions to read from this Channel topic: "


async def _prepare(dsn: str, extra_sql: str = "") -> None:
    from hub.store.migrate import migrate

    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(POLICIES + extra_sql)
    finally:
        await conn.close()


async def _new_policy_database(extra_sql: str = "") -> tuple[str, str]:
    name = new_database_name()
    dsn = await create_database(name)
    await _prepare(dsn, extra_sql)
    return name, dsn


@pytest.fixture(scope="module")
def policy_dsn() -> Iterator[str]:
    name, dsn = run_sync(_new_policy_database)
    yield dsn
    run_sync(lambda: drop_database(name))


@pytest.fixture(scope="module")
def hub(policy_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    started = start_hub(tmp_path_factory.mktemp("policies"), {"HUB_DATABASE_URL": policy_dsn})
    yield started
    stop_hub(started)
    assert "Traceback" not in started.log(), started.log()


@pytest.fixture
async def arena(hub: HubProcess, policy_dsn: str) -> AsyncIterator[PrivateArena]:
    async with private_arena(hub, policy_dsn) as running:
        yield running


def not_read(name: str) -> str:
    return UNAUTHORIZED_READ + name


# -- public/private confusion ------------------------------------------------------


async def test_the_public_twin_hears_nothing_private(arena: PrivateArena) -> None:
    """The public channel of the vault's name is open to anyone, and is
    another channel: what the spies publish there reaches the other spy
    (the channel works) and never the victim; the victim's socket and SQL
    traffic never reaches the spies (checked by the arena)."""
    anon, user = arena.spies
    await user.broadcast(arena.topic, user.client.join_refs[arena.topic], {"m": user.marker})
    heard = await anon.wait_for(lambda m: arena.attacker_marker in json.dumps(m.payload))
    assert heard.payload["event"] == "msg"
    # A public database broadcast reaches the public twin only.
    await arena.sql_send({"m": arena.attacker_marker, "public": True}, private=False)
    await user.wait_for(lambda m: m.user_event == "sql" and m.body.get("public") is True)
    await arena.quiet()


#: ``config.private`` variants: "private" (checked by the policies, so
#: refused to the attacker), "invalid" (refused as a bad payload), "public".
PRIVATE_VARIANTS: list[tuple[Any, str]] = [
    (True, "private"),
    ("true", "private"),
    ("TRUE", "private"),
    ("True", "private"),
    ("tRuE", "private"),
    (1, "invalid"),
    (0, "invalid"),
    (1.0, "invalid"),
    ("1", "invalid"),
    ("yes", "invalid"),
    ("on", "invalid"),
    (" true", "invalid"),
    ("true\u0000", "invalid"),
    ("t", "invalid"),
    ({"value": True}, "invalid"),
    ({"private": True}, "invalid"),
    ([True], "invalid"),
    ([], "invalid"),
    ({}, "invalid"),
    (None, "public"),
    (False, "public"),
    ("false", "public"),
    ("FALSE", "public"),
]


async def test_private_flag_variants_never_open_the_private_channel(
    arena: PrivateArena,
) -> None:
    for index, (value, kind) in enumerate(PRIVATE_VARIANTS):
        conn = await arena.attacker(vsn=V2 if index % 2 else V1)
        config = {"broadcast": {"self": False}, "presence": {"enabled": True}, "private": value}
        what = f"private={value!r}"
        if kind == "public":
            join_ref, reply = await conn.join(arena.topic, config)
            assert reply["status"] == "ok", (what, reply)
            await conn.broadcast(arena.topic, join_ref, {"m": conn.marker, "i": index})
            # It is the public twin: the spies hear it.
            await arena.spies[0].wait_for(
                lambda m, i=index: m.body == {"m": arena.attacker_marker, "i": i}
            )
        else:
            reason = await refused(conn, arena.topic, config)
            expected = not_read(arena.name) if kind == "private" else "InvalidJoinPayload: "
            assert reason.startswith(expected), (what, reason)
        await conn.heartbeat()
    # A duplicated key: whichever value wins, no leak (the arena checks).
    conn = await arena.attacker(vsn=V1)
    frame = (
        f'{{"topic": "{arena.topic}", "event": "phx_join", "ref": "d1", "join_ref": "d1",'
        ' "payload": {"config": {"private": true, "private": false}}}'
    )
    await conn.client.send_raw(frame)
    reply = await conn.wait_for(lambda m: m.ref == "d1")
    if reply.status == "ok":
        await conn.broadcast(arena.topic, "d1", {"m": conn.marker})
    # private inside another section means nothing: public.
    join_ref, reply = await (await arena.attacker(vsn=V2)).join(
        arena.topic, {"broadcast": {"private": True}, "presence": {"private": True}}
    )
    assert reply["status"] == "ok", reply
    await arena.quiet()


async def test_rejoins_switching_kind_under_one_join_ref(arena: PrivateArena) -> None:
    """A public channel rejoined as private under the same join_ref (and
    the reverse order, and pipelined frames) never subscribes the attacker
    to the private channel nor lets it publish there."""
    conn = await arena.attacker(vsn=V1)
    ref = "J"
    public_join = conn.client.message(
        arena.topic, "phx_join", {"config": PUBLIC}, ref=ref, join_ref=ref
    )
    assert (await conn.client.call(public_join)).status == "ok"
    for value in (True, "TRUE"):
        again = conn.client.message(
            arena.topic,
            "phx_join",
            {"config": {**private(), "private": value}},
            ref=ref,
            join_ref=ref,
        )
        reply = await conn.client.call(again)
        assert reply.status == "error", reply
        assert reply.response["reason"] == not_read(arena.name), reply
    # The refused rejoin left the public channel as it was: what is sent
    # under the join_ref goes to the public twin (the spies hear it).
    await conn.broadcast(arena.topic, ref, {"m": conn.marker, "after": "rejoin"})
    await arena.spies[1].wait_for(
        lambda m: m.body == {"m": arena.attacker_marker, "after": "rejoin"}
    )

    # Pipelined: a private join, then at once a broadcast, a track and an
    # access_token under its join_ref, before its (refusing) reply.
    second = await arena.attacker(vsn=V2)
    k = "K"
    frames = [
        second.client.message(arena.topic, "phx_join", {"config": private()}, ref=k, join_ref=k),
        second.client.message(
            arena.topic,
            "broadcast",
            {"type": "broadcast", "event": "msg", "payload": {"m": second.marker}},
            ref="K2",
            join_ref=k,
        ),
        second.client.message(
            arena.topic,
            "presence",
            {"type": "presence", "event": "track", "payload": {"m": second.marker}},
            ref="K3",
            join_ref=k,
        ),
    ]
    for frame in frames:
        await second.client.send(frame)
    await second.client.send_raw(
        encode_kind3(k, "K4", arena.topic, "msg", json.dumps({"m": second.marker}).encode())
    )
    for ref_, reason in (
        ("K", not_read(arena.name)),
        ("K2", "unmatched topic"),
        ("K3", "unmatched topic"),
        ("K4", "unmatched topic"),
    ):
        reply = await second.wait_for(lambda m, r=ref_: m.event == "phx_reply" and m.ref == r)
        assert reply.status == "error", reply
        assert reply.response["reason"] == reason, reply

    # The reverse: private refused first, then public, then private again.
    third = await arena.attacker(vsn=V1)
    assert await refused(third, arena.topic, private()) == not_read(arena.name)
    join_ref, reply = await third.join(arena.topic, PUBLIC)
    assert reply["status"] == "ok"
    retry = third.client.message(
        arena.topic, "phx_join", {"config": private()}, ref=join_ref, join_ref=join_ref
    )
    assert (await third.client.call(retry)).status == "error"
    await third.broadcast(arena.topic, join_ref, {"m": third.marker})
    await arena.quiet()


REST_PRIVATE_VARIANTS: list[Any] = [
    True,
    "true",
    "TRUE",
    1,
    "1",
    "yes",
    None,
    False,
    "false",
    {"value": True},
    [True],
]


async def test_rest_broadcast_with_private_variants_never_injects(arena: PrivateArena) -> None:
    """The attacker's REST broadcasts, with ``private`` spelled every way,
    never reach the private channel.  ``true`` is refused (403: no write
    policy), and a batch is all or nothing."""
    token = arena.attacker_token()
    for value in REST_PRIVATE_VARIANTS:
        message = {
            "topic": arena.name,
            "event": "msg",
            "payload": {"m": arena.attacker_marker, "private": repr(value)},
            "private": value,
        }
        response = await arena.http(
            "POST", "/realtime/v1/api/broadcast", token, json={"messages": [message]}
        )
        if value is True:
            assert response.status_code == 403, response.text
            assert "Unauthorized" in response.text, response.text
        else:
            assert response.status_code in (202, 403, 422), (value, response.text)
    # All or nothing: a public message batched with a refused private one
    # is not published either.
    batch_marker = "BATCH-" + arena.mark
    response = await arena.http(
        "POST",
        "/realtime/v1/api/broadcast",
        token,
        json={
            "messages": [
                {"topic": arena.name, "event": "msg", "payload": {"m": batch_marker}},
                {"topic": arena.name, "event": "msg", "payload": {"m": "x"}, "private": True},
            ]
        },
    )
    assert response.status_code == 403, response.text
    # The single-message route names a private channel with ?private=true
    # (supabase-js httpSend, realtime-py http_send): the write policy says no.
    for query in ("?private=true", "?private=TRUE"):
        response = await arena.http(
            "POST",
            f"/realtime/v1/api/broadcast/{arena.name}/events/msg{query}",
            token,
            json={"m": arena.attacker_marker},
        )
        assert response.status_code == 403, response.text
    response = await arena.http(
        "POST",
        f"/realtime/v1/api/broadcast/{arena.name}/events/msg?private=yes",
        token,
        json={"m": arena.attacker_marker},
    )
    assert response.status_code == 422, response.text
    # A forged service_role (wrong key) is no service_role.
    forged = hs256(
        {"alg": "HS256", "typ": "JWT"},
        {"role": "service_role", "exp": int(time.time()) + 600},
        b"not-the-secret",
    )
    message = {"topic": arena.name, "event": "msg", "payload": {"m": arena.attacker_marker}}
    response = await arena.http(
        "POST",
        "/realtime/v1/api/broadcast",
        forged,
        json={"messages": [{**message, "private": True}]},
    )
    assert response.status_code == 401, response.text
    await arena.quiet()
    for spy in arena.spies:
        assert batch_marker not in spy.text(), "a refused batch was partly published"


async def test_a_private_rest_message_never_goes_public_by_its_spelling(
    arena: PrivateArena,
) -> None:
    """The victim's own REST broadcasts with ``private`` spelled as a string
    or a number: "true" in any case is private (Supabase casts it so), and
    anything that is not a boolean is refused (422).  None may reach the
    public channel of the name: the arena's spies sit there, and its final
    check fails if the victim's marker reached them."""
    token = arena.victim_token(aal="aal2")
    for value in ("true", "TRUE", "True", 1, "1", "yes", 0, "on"):
        message = {
            "topic": arena.name,
            "event": "msg",
            "payload": {"m": arena.victim_marker, "private": repr(value)},
            "private": value,
        }
        response = await arena.http(
            "POST", "/realtime/v1/api/broadcast", token, json={"messages": [message]}
        )
        expected = 202 if isinstance(value, str) and value.lower() == "true" else 422
        assert response.status_code == expected, (value, response.text)
    response = await arena.http(
        "POST",
        f"/realtime/v1/api/broadcast/{arena.name}/events/msg?private=1",
        token,
        json={"m": arena.victim_marker},
    )
    assert response.status_code == 422, response.text
    await arena.quiet()


# -- policy bypass ---------------------------------------------------------------------


def _wrong_key(claims: dict[str, Any]) -> str:
    return hs256({"alg": "HS256", "typ": "JWT"}, claims, secrets.token_bytes(32))


async def test_forged_and_foreign_roles_are_refused(arena: PrivateArena) -> None:
    now = int(time.time())
    base = {"exp": now + 600, "iat": now, "aud": "authenticated", "aal": "aal2"}
    forged = {
        "service_role with a wrong key": _wrong_key({**base, "role": "service_role"}),
        "the victim's sub with a wrong key": _wrong_key(
            {**base, "role": "authenticated", "sub": arena.victim_sub}
        ),
        "alg none as the victim": forge(
            {"alg": "none", "typ": "JWT"}, {**base, "role": "service_role", "sub": arena.victim_sub}
        ),
        "the victim's sub, signature stripped": arena.victim_token().rsplit(".", 1)[0] + ".",
    }
    # The connection's own token: a valid attacker token.  Every forgery is
    # refused at the handshake and, as a join's access_token, at the join.
    conn = await arena.attacker(vsn=V1)
    for what, token in forged.items():
        assert await handshake_status(arena.hub, token) == 401, what
        reason = await refused(conn, arena.topic, private(), access_token=token)
        assert reason.startswith("InvalidJWTToken"), (what, reason)

    # Correctly signed tokens naming a role that is not one of Supabase's
    # three, or an odd spelling of one: never the database role's rights.
    for role in (
        "postgres",
        "supabase_admin",
        "pg_read_all_data",
        "pg_write_server_files",
        "AUTHENTICATED",
        "authenticated ",
        "service_role ",
        "Service_Role",
        "authenticated; reset role",
        "none",
        "public",
        "",
    ):
        token = arena.token(arena.victim_sub, role=role, aal="aal2")
        try:
            member = await arena.attacker(token, V2)
        except Exception as exc:  # refused at the handshake: fine
            assert "401" in str(exc), (role, exc)
            continue
        reason = await refused(member, arena.topic, private())
        assert reason.startswith("Unauthorized"), (role, reason)
        # Also through REST: no write either.
        response = await arena.http(
            "POST",
            "/realtime/v1/api/broadcast",
            token,
            json={
                "messages": [
                    {
                        "topic": arena.name,
                        "event": "msg",
                        "payload": {"m": arena.attacker_marker},
                        "private": True,
                    }
                ]
            },
        )
        assert response.status_code in (401, 403), (role, response.text)

    # The victim's identity smuggled into other claims of the attacker's
    # own (valid) token.
    smuggled = arena.attacker_token(
        user_id=arena.victim_sub,
        uid=arena.victim_sub,
        **{"request.jwt.claim.sub": arena.victim_sub, "realtime.topic": arena.name},
        app_metadata={"sub": arena.victim_sub, "role": "service_role"},
        user_metadata={"sub": arena.victim_sub, "role": "service_role"},
    )
    member = await arena.attacker(smuggled, V1)
    assert await refused(member, arena.topic, private()) == not_read(arena.name)
    # No sub, or a sub that is not a string.
    for sub in (None, 42, [arena.victim_sub], {"id": arena.victim_sub}, ""):
        token = _signed(arena, {"role": "authenticated", "sub": sub})
        try:
            member = await arena.attacker(token, V2)
        except Exception as exc:
            assert "401" in str(exc), (sub, exc)
            continue
        reason = await refused(member, arena.topic, private())
        assert reason.startswith("Unauthorized"), (sub, reason)
    await arena.quiet()


def _signed(arena: PrivateArena, claims: dict[str, Any]) -> str:
    now = int(time.time())
    full = {"exp": now + 600, "iat": now, "aud": "authenticated", "aal": "aal2", **claims}
    full = {k: v for k, v in full.items() if v is not None}
    return hs256({"alg": "HS256", "typ": "JWT"}, full, arena.hub.secret.encode())


def _signed_raw(arena: PrivateArena, body: str) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(body.encode())
    mac = hmac.new(arena.hub.secret.encode(), f"{head}.{payload}".encode(), hashlib.sha256)
    return f"{head}.{payload}.{b64url(mac.digest())}"


async def test_claims_a_policy_reads_cannot_be_smuggled(arena: PrivateArena) -> None:
    """``staff:*`` is readable by ``email`` ending in ``@victim.example``
    (a policy on ``request.jwt.claims``).  The claim elsewhere, in another
    shape, or spelled otherwise does not pass; the real claim does (the
    control proves the policy is live)."""
    staff = "staff:" + arena.mark
    topic = "realtime:" + staff
    staff_member = await arena.victim_conn(
        arena.token(str(uuid.uuid4()), email="ann@victim.example"), V2
    )
    _, reply = await staff_member.join(topic, private())
    assert reply["status"] == "ok", reply
    for what, claims in {
        "in user_metadata": {"user_metadata": {"email": "m@victim.example"}},
        "in app_metadata": {"app_metadata": {"email": "m@victim.example"}},
        "as a list": {"email": ["m@victim.example"]},
        "as an object": {"email": {"email": "m@victim.example"}},
        "upper case": {"email": "m@VICTIM.EXAMPLE"},
        "as a prefix": {"email": "m@victim.example.evil.com"},
        "with a newline": {"email": "m@evil.com\n@victim.example.x"},
        "as a setting name": {"request.jwt.claim.email": "m@victim.example"},
    }.items():
        conn = await arena.attacker(arena.attacker_token(**claims), V1)
        reason = await refused(conn, topic, private())
        assert reason == not_read(staff), (what, reason)
    # A NUL inside the claim: the policy may raise reading it; either way
    # an error reply.
    conn = await arena.attacker(arena.attacker_token(email="m@evil\u0000@victim.example"), V2)
    reason = await refused(conn, topic, private())
    assert reason.startswith(("Unauthorized", "RlsPolicyError")), reason
    await arena.sql_send({"m": arena.victim_marker, "staff": 1}, staff)
    await staff_member.wait_for(lambda m: m.user_event == "sql" and m.body.get("staff") == 1)
    await arena.quiet()


async def test_claims_that_are_not_json_safe(arena: PrivateArena) -> None:
    """Claims PostgreSQL cannot take as JSON text (or that are absurd)
    never become permission, never crash the hub; where the handshake
    accepts such a token the public channel still works with it."""
    sub = arena.attacker_sub
    exp, victim = int(time.time()) + 600, arena.victim_sub
    head = f'"role": "authenticated", "sub": "{sub}", "exp": {exp}'

    def body(**extra: str) -> str:
        return "{" + head + "".join(f', "{k}": {v}' for k, v in extra.items()) + "}"

    bodies = {
        "huge integer": body(n="9" * 400),
        "2**64": body(n=str(2**64)),
        "-2**63-1": body(n=str(-(2**63) - 1)),
        "exp as a float": body(exp=str(exp) + ".5"),
        "nested 300": body(deep="[" * 300 + "]" * 300),
        "nested 1100": body(deep="[" * 1100 + "]" * 1100),
        "nested objects 300": body(deep='{"a":' * 300 + "1" + "}" * 300),
        "lone surrogate": body(email='"\\ud800@victim.example"'),
        "NUL in sub": body(sub='"' + victim + '\\u0000"'),
        "NaN": body(n="NaN"),
    }
    for index, (what, text) in enumerate(bodies.items()):
        token = _signed_raw(arena, text)
        if len(token) > 8192:
            assert await handshake_status(arena.hub, token) == 401, what
            continue
        try:
            conn = await arena.attacker(token, V2 if index % 2 else V1)
        except Exception as exc:
            assert "401" in str(exc), (what, exc)
            continue
        reason = await refused(conn, arena.topic, private())
        assert reason.startswith(("Unauthorized", "RlsPolicyError")), (what, reason)
        _join_ref, reply = await conn.join("realtime:open:" + arena.mark, PUBLIC)
        assert reply["status"] == "ok", (what, reply)
        await conn.heartbeat()
    await arena.quiet()


SQL_TOPICS = [
    "vault:x' or '1'='1",
    "vault:x'; drop table realtime.messages; --",
    'vault:" or ""="',
    "vault:%",
    "vault:_",
    "%",
    "_",
    "vault:$1",
    "vault:\\",
    "vault:x\\' or 1=1 --",
    "vault:E'\\x41'",
    "vault:x/**/or/**/1=1",
    "vault:' union select id from realtime.messages --",
    "vault:{}",
    "vault:null",
]


async def test_sql_looking_topics(arena: PrivateArena) -> None:
    conn = await arena.attacker(vsn=V2)
    like = arena.name[:-2] + "%"
    for index, name in enumerate([*SQL_TOPICS, like, arena.name[:-1] + "_"]):
        if index % 10 == 9:
            conn = await arena.attacker(vsn=V1)  # stay under the join rate
        assert await refused(conn, "realtime:" + name, private()) == not_read(name), name
    # The same text is a channel like any other for its owner: kept byte
    # for byte through the policies and the database broadcast.
    quoted = 'vault:it\'s "quoted"; -- %_\\'
    await arena.own(quoted)
    owner = await arena.victim_conn()
    _, reply = await owner.join("realtime:" + quoted, private())
    assert reply["status"] == "ok", reply
    await arena.sql_send({"m": arena.victim_marker, "q": 1}, quoted)
    heard = await owner.wait_for(lambda m: m.user_event == "sql" and m.body.get("q") == 1)
    assert heard.topic == "realtime:" + quoted
    rows = await arena.execute("select count(*) as n from public.vault_owners")
    assert rows[0]["n"] >= 2  # the table is still there
    await arena.quiet()


async def test_topics_at_and_past_the_length_limit(arena: PrivateArena) -> None:
    prefix = "vault:" + arena.mark
    at_limit = prefix + "x" * (246 - len(prefix))
    multibyte = prefix + "x" * (244 - len(prefix)) + "\u00e9"  # 246 bytes
    assert len(at_limit.encode()) == 246 and len(multibyte.encode()) == 246
    for name in (at_limit, multibyte):
        await arena.own(name)
        owner = await arena.victim_conn()
        _, reply = await owner.join("realtime:" + name, private())
        assert reply["status"] == "ok", reply
        conn = await arena.attacker(vsn=V2)
        reason = await refused(conn, "realtime:" + name, private())
        assert reason == not_read(name), reason
        await arena.sql_send({"m": arena.victim_marker, "long": name[-3:]}, name)
        await owner.wait_for(
            lambda m, n=name: m.user_event == "sql" and m.body.get("long") == n[-3:]
        )
    past = [at_limit + "x", multibyte[:-1] + "\u00e9x", prefix + "\u20ac" * 81, at_limit * 40]
    owner = await arena.victim_conn(vsn=V1)
    for name in past:
        assert len(name.encode()) > 246
        await arena.own(name)  # even a policy that would allow it
        for conn in (owner, await arena.attacker(vsn=V1)):
            reason = await refused(conn, "realtime:" + name, private())
            assert reason.startswith("Unauthorized: topic names are at most 246 bytes"), reason
            assert len(reason) < 400, "the reason echoes the whole topic"
        response = await arena.http(
            "POST",
            "/realtime/v1/api/broadcast",
            arena.victim_token(),
            json={"messages": [{"topic": name, "event": "e", "payload": {}, "private": True}]},
        )
        assert response.status_code == 422, response.text
        # From SQL: the row is written, the hub cannot route it, drops it.
        await arena.sql_send({"m": arena.victim_marker, "past": 1}, name)
    await arena.quiet()


async def _swap(conn: Conn, topic: str, token: Any) -> None:
    join_ref = conn.client.join_refs[topic]
    await conn.send(topic, "access_token", {"access_token": token}, None, join_ref)


async def _ended(conn: Conn, arena: PrivateArena) -> None:
    system = await conn.wait_for(lambda m: m.event == "system" and m.topic == arena.topic)
    assert system.payload["status"] == "error", system
    await conn.wait_for(lambda m: m.event == "phx_close" and m.topic == arena.topic)


async def test_a_token_swapped_mid_channel(arena: PrivateArena) -> None:
    """An ``access_token`` message on a private channel asks the policies
    again: a weaker token of the same user keeps what it allows (read, no
    more write); another user's, a foreign role's, anon's, a forged or an
    expired token end the channel, which then hears nothing."""
    # The same user without the second factor: still reads, may not write.
    insider = await arena.victim_conn(vsn=V2)
    join_ref, reply = await insider.join(arena.topic, private())
    assert reply["status"] == "ok"
    insider.client.join_refs[arena.topic] = join_ref
    await insider.broadcast(arena.topic, join_ref, {"m": insider.marker, "before": 1})
    await arena.victim.wait_for(lambda m: m.body == {"m": insider.marker, "before": 1})
    await _swap(insider, arena.topic, arena.victim_token(aal="aal1"))
    await asyncio.sleep(0.3)
    arena.victims.remove(insider)
    arena.others.append(insider)  # it may still read: it hears the victim
    insider.marker = arena.attacker_marker
    since = len(insider.messages)
    await insider.broadcast(arena.topic, join_ref, {"m": insider.marker, "after": 1})
    # Read is kept: the victim's traffic still arrives, and the channel
    # was not ended.
    await insider.client.wait_for(lambda m: arena._victims(m, "msg"), since=since, within=2)
    assert not [m for m in insider.messages if m.event in ("system", "phx_close")]

    swaps = {
        "anon": arena.token(None, role="anon"),
        "another user": arena.attacker_token(),
        "role postgres": arena.token(arena.victim_sub, role="postgres", aal="aal2"),
        "forged service_role": _wrong_key({"role": "service_role", "exp": int(time.time()) + 60}),
        "the victim, forged": _wrong_key(
            {"role": "authenticated", "sub": arena.victim_sub, "exp": int(time.time()) + 60}
        ),
        "expired": arena.victim_token(ttl=-10),
        "not a string": {"role": "service_role"},
        "a number": 42,
    }
    for index, (what, token) in enumerate(swaps.items()):
        conn = await arena.victim_conn(vsn=V1 if index % 2 else V2)
        join_ref, reply = await conn.join(arena.topic, private())
        assert reply["status"] == "ok", reply
        conn.client.join_refs[arena.topic] = join_ref
        await conn.wait_for(lambda m: arena._victims(m, "msg"))
        await _swap(conn, arena.topic, token)
        arena.victims.remove(conn)
        try:
            await _ended(conn, arena)
        except AssertionError as exc:
            raise AssertionError(f"{what}: the channel was not ended: {exc}") from None
        # From the end on, nothing of the victim.
        arena.turned(conn)
        reply_ = await conn.request(
            arena.topic,
            "broadcast",
            {"type": "broadcast", "event": "msg", "payload": {"m": conn.marker}},
            join_ref=join_ref,
        )
        assert reply_["response"] == {"reason": "unmatched topic"}, (what, reply_)
    await arena.quiet(0.8)


async def test_presence_track_with_read_but_no_write(arena: PrivateArena) -> None:
    lobby = "lobby:" + arena.mark
    topic = "realtime:" + lobby
    await arena.own(lobby)
    owner = await arena.victim_conn()
    join_ref, reply = await owner.join(topic, private())
    assert reply["status"] == "ok"
    owner.client.join_refs[topic] = join_ref
    await owner.client.track(topic, {"who": "owner"})
    await owner.wait_for(lambda m: m.event == "presence_diff" and "owner" in json.dumps(m.payload))
    for vsn in (V1, V2):
        conn = await arena.attacker(vsn=vsn)
        join_ref, reply = await conn.join(topic, private(ack=True))
        assert reply["status"] == "ok", reply  # anyone signed in may read a lobby
        await conn.wait_for(lambda m: m.event == "presence_state")
        for _ in range(2):  # denied, and the denial is remembered
            body = {"type": "presence", "event": "track", "payload": {"m": conn.marker}}
            answer = await conn.request(topic, "presence", body, join_ref=join_ref)
            assert answer["status"] == "error", answer
            assert answer["response"]["reason"] == (
                f"Unauthorized: You do not have permissions to write to this Channel topic: {lobby}"
            )
        # A broadcast is dropped silently, even with ack.
        ref = conn.client.next_ref()
        await conn.client.broadcast(topic, "msg", {"m": conn.marker}, ref=ref, join_ref=join_ref)
        untrack = await conn.request(
            topic, "presence", {"type": "presence", "event": "untrack"}, join_ref=join_ref
        )
        assert untrack["status"] == "ok"
        await asyncio.sleep(0.3)
        assert not [m for m in conn.messages if m.event == "phx_reply" and m.ref == ref]
    await arena.quiet()
    # The owner's presence is untouched: still exactly one meta, its own.
    state = [m for m in owner.messages if m.event in ("presence_state", "presence_diff")]
    assert arena.attacker_marker not in json.dumps([m.payload for m in state])


async def test_each_extension_needs_its_own_read(arena: PrivateArena) -> None:
    """Broadcast read does not give presence, presence read does not give
    broadcasts: the owner's presence on ``news:*`` and broadcasts on
    ``pres:*`` never reach a reader of the other extension only."""
    for kind, event in (("news", "presence"), ("pres", "broadcast")):
        name = f"{kind}:{arena.mark}"
        topic = "realtime:" + name
        await arena.own(name)
        owner = await arena.victim_conn()
        join_ref, reply = await owner.join(topic, private())
        assert reply["status"] == "ok", reply
        owner.client.join_refs[topic] = join_ref
        readers = [await arena.attacker(vsn=vsn) for vsn in (V1, V2)]
        for reader in readers:
            _, reply = await reader.join(topic, private())
            assert reply["status"] == "ok", reply
        if event == "presence":
            await owner.client.track(topic, {"m": arena.victim_marker})
            # The owner reads its own presence: the diff exists.
            await owner.wait_for(lambda m: m.event == "presence_diff")
            # Broadcasts do reach the readers (the channel is live for them).
            await owner.broadcast(topic, join_ref, {"n": "news"})
            for reader in readers:
                await reader.wait_for(lambda m: m.body == {"n": "news"})
        else:
            await owner.broadcast(topic, join_ref, {"m": arena.victim_marker})
            await owner.client.track(topic, {"p": "pres"})
            for reader in readers:
                await reader.wait_for(
                    lambda m: m.event == "presence_diff" and "pres" in json.dumps(m.payload)
                )
        for reader in readers:
            events = {m.event for m in reader.messages}
            if event == "presence":
                assert not events & {"presence_state", "presence_diff"}, events
    await arena.quiet()


async def test_frames_before_a_join(arena: PrivateArena) -> None:
    """Broadcasts, tracks, access tokens and leaves on the private topic
    from a socket that never joined it, under every join_ref an attacker
    can guess (the victim's included), in both serializers."""
    victim_ref = arena.victim.client.join_refs.get(arena.topic)
    for vsn in (V1, V2):
        conn = await arena.attacker(vsn=vsn)
        for join_ref in (None, "1", "2", victim_ref, ""):
            for event, body in (
                ("broadcast", {"type": "broadcast", "event": "msg", "payload": {"m": conn.marker}}),
                ("presence", {"type": "presence", "event": "track", "payload": {"m": conn.marker}}),
                ("access_token", {"access_token": arena.victim_token()}),
                ("phx_leave", {}),
            ):
                answer = await conn.request(arena.topic, event, body, join_ref=join_ref)
                assert answer == {"status": "error", "response": {"reason": "unmatched topic"}}, (
                    event,
                    join_ref,
                    answer,
                )
        if vsn == V2:
            frame = encode_kind3(
                victim_ref or "1", "b1", arena.topic, "msg", json.dumps({"m": conn.marker}).encode()
            )
            await conn.client.send_raw(frame)
        await conn.heartbeat()
    await arena.quiet()


async def test_replay_on_a_private_channel(arena: PrivateArena) -> None:
    """The victim's database broadcasts are rows of realtime.messages:
    no replay request hands them to an attacker."""
    stored = await arena.execute(
        "select count(*) as n from realtime.messages where topic = $1", arena.name
    )
    assert stored[0]["n"] >= 1
    conn = await arena.attacker(vsn=V2)
    for replay in (
        {"since": 0, "limit": 25},
        {"since": 0},
        {"after": 0},
        {"after_id": str(uuid.uuid4())},
        {"since": "0", "limit": "25"},
        {"limit": 10_000},
        True,
    ):
        config = {**private(), "broadcast": {"self": False, "replay": replay}}
        reason = await refused(conn, arena.topic, config)
        assert reason.startswith(("Unauthorized", "InvalidJoinPayload")), (replay, reason)
    public = await arena.attacker(vsn=V1)
    reason = await refused(
        public, arena.topic, {"broadcast": {"replay": {"since": 0}}, "private": False}
    )
    assert reason == "UnableToReplayMessages: Replay is not allowed for public channels"
    await arena.quiet()


async def test_realtime_send_with_bad_input_keeps_the_hub_serving(arena: PrivateArena) -> None:
    for payload, topic, private_ in (
        ("[1, 2]", arena.name, True),
        ('"text"', arena.name, True),
        ("null", arena.name, True),
        ('{"m": "x"}', None, True),
        ('{"m": "x"}', "", True),
        ('{"m": "x"}', arena.name, None),
    ):
        await arena.execute(
            "select realtime.send($1::jsonb, 'bad', $2, $3)", payload, topic, private_
        )
    await arena.quiet()
    # Nothing but objects is ever delivered.
    bad = [m.body for m in arena.victim.messages if m.user_event == "bad"]
    assert all(isinstance(body, dict) for body in bad), bad


# -- bad database states --------------------------------------------------------------

BOOM = """
create function public.boom(topic text, pattern text) returns boolean
language plpgsql volatile as $$
begin
  if topic like pattern then
    raise exception 'SECRET-LEAK % in the policy', topic;
  end if;
  return false;
end $$;
grant execute on function public.boom(text, text) to authenticated, anon;
-- Reading boom:* raises; wboom:* may be read by anyone, writing it raises.
create policy "boom read" on realtime.messages
  for select to authenticated using (public.boom(realtime.topic(), 'boom:%'));
create policy "wboom read" on realtime.messages
  for select to authenticated using (realtime.topic() like 'wboom:%');
create policy "wboom write" on realtime.messages
  for insert to authenticated with check (public.boom(realtime.topic(), 'wboom:%'));
"""


@pytest.fixture
async def own_database() -> AsyncIterator[str]:
    """A database of the test's own (the test breaks it)."""
    name = new_database_name()
    dsn = await create_database(name)
    try:
        yield dsn
    finally:
        await drop_database(name)


def _hub_on(dsn: str, tmp_path: Path) -> HubProcess:
    return start_hub(tmp_path, {"HUB_DATABASE_URL": dsn})


async def test_a_policy_that_raises(own_database: str, tmp_path: Path) -> None:
    dsn = own_database
    await _prepare(dsn, BOOM)
    hub = _hub_on(dsn, tmp_path)
    try:
        async with private_arena(hub, dsn) as arena:
            for vsn in (V1, V2):
                conn = await arena.attacker(vsn=vsn)
                reason = await refused(conn, "realtime:boom:" + arena.mark, private())
                assert reason.startswith("RlsPolicyError"), reason
                assert "SECRET" not in json.dumps(conn.messages[-1].payload), reason
                # A write policy that raises: the broadcast is dropped, the
                # track refused, nothing leaks, the channel lives on.
                listener = await arena.attacker(vsn=V2)
                wtopic = "realtime:wboom:" + arena.mark
                _, reply = await listener.join(wtopic, private())
                assert reply["status"] == "ok", reply
                join_ref, reply = await conn.join(wtopic, private(ack=True))
                assert reply["status"] == "ok", reply
                await conn.broadcast(wtopic, join_ref, {"m": "wboom"})
                body = {"type": "presence", "event": "track", "payload": {"m": "wboom"}}
                answer = await conn.request(wtopic, "presence", body, join_ref=join_ref)
                assert answer["status"] == "error", answer
                assert "SECRET" not in json.dumps(answer)
                await asyncio.sleep(0.3)
                assert "wboom" not in json.dumps([m.payload for m in listener.messages][1:])
                await conn.heartbeat()
            # The pool is healthy after the failures: the victim joins again.
            again = await arena.victim_conn()
            _, reply = await again.join(arena.topic, private())
            assert reply["status"] == "ok", reply
    finally:
        stop_hub(hub)
    assert "SECRET-LEAK" in hub.log()  # the cause went to the log only


def _today_partition() -> str:
    return "messages_" + dt.datetime.now(dt.UTC).strftime("%Y_%m_%d")


async def test_no_partition_for_today(own_database: str, tmp_path: Path) -> None:
    dsn = own_database
    await _prepare(dsn)
    hub = _hub_on(dsn, tmp_path)
    try:
        async with private_arena(hub, dsn) as arena:
            # The arena's SQL sends fail while the partition is missing.
            await arena.execute(f"drop table realtime.{_today_partition()}")
            for conn in (await arena.attacker(vsn=V1), await arena.victim_conn(vsn=V2)):
                reason = await refused(conn, arena.topic, private())
                assert reason.startswith("MissingPartition"), reason
                _join_ref, reply = await conn.join(arena.topic, PUBLIC)
                assert reply["status"] == "ok", reply
            # realtime.send never raises, even now.
            await arena.sql_send({"m": arena.victim_marker, "nopart": 1})
            await arena.quiet()
            assert not [
                m
                for m in arena.victim.messages
                if m.body == {"m": arena.victim_marker, "nopart": 1}
            ]
            await arena.execute("select hub.realtime_create_partitions()")
            again = await arena.victim_conn()
            _, reply = await again.join(arena.topic, private())
            assert reply["status"] == "ok", reply
    finally:
        stop_hub(hub)


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    server = PgServer.create()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def test_the_database_down_at_join_time(pg_server: PgServer, tmp_path: Path) -> None:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute("create database app")
    finally:
        await admin.close()
    dsn = pg_server.dsn("app")
    await _prepare(dsn)
    hub = _hub_on(dsn, tmp_path)
    try:
        # asyncpg's pool logs a traceback (a WARNING) while it cannot
        # restore its connection floor: expected with the database down.
        async with private_arena(hub, dsn, traceback_ok=True) as arena:
            watcher = await arena.attacker(vsn=V1)
            pg_server.stop("fast")
            conn = await arena.attacker(vsn=V2)
            started = time.monotonic()
            pending = asyncio.create_task(refused(conn, arena.topic, private()))
            # The event loop is not blocked while the check waits.
            await asyncio.sleep(0.05)
            beat = time.monotonic()
            await watcher.heartbeat()
            assert time.monotonic() - beat < 1.0
            reason = await pending
            assert reason.startswith(
                ("UnableToConnectToProject", "IncreaseConnectionPool", "DatabaseTimeout")
            ), reason
            assert time.monotonic() - started < 10
            victim_new = await arena.victim_conn()
            reason = await refused(victim_new, arena.topic, private())
            assert reason.startswith(("UnableToConnectToProject", "IncreaseConnectionPool")), reason
            # Public channels do not need the database.
            _join_ref, reply = await conn.join(arena.topic, PUBLIC)
            assert reply["status"] == "ok", reply
            # The victim's channel (its checks cached) keeps working.
            seen = len(arena.victim.messages)
            await arena.victim.client.wait_for(lambda m: arena._victims(m, "msg"), since=seen)
            pg_server.start()
            deadline = time.monotonic() + 15
            while True:
                back = await arena.victim_conn()
                _, reply = await back.join(arena.topic, private())
                if reply["status"] == "ok" or time.monotonic() > deadline:
                    break
                await back.close()
                arena.victims.remove(back)
                await asyncio.sleep(0.5)
            assert reply["status"] == "ok", reply
    finally:
        stop_hub(hub)
