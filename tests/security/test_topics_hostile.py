"""Hostile topic names: an attacker who is a member of its own org tries to
reach the victim org's channels by spelling the topic differently.

Org ids are matched byte for byte (``[A-Za-z0-9][A-Za-z0-9_-]{0,63}``): no
case folding, no trimming, no Unicode normalisation, no wildcards.  A variant
inside a reserved namespace (first ``:``-separated segment exactly ``org``,
``user`` or ``mother``) must be refused with ``phx_reply`` error
``Unauthorized: ...`` while the socket stays open.  Any other variant is a
free name, an ordinary Supabase channel of its own (README, "Auth and
tenancy"): the attacker may join it, and publishes its marker there, but
hears nothing of the victim and the victim hears nothing of it; the same
holds for legitimately joinable look-alikes (the attacker's own org or a
sub-channel named after the victim).  Each case runs in an arena
(``tests/support/arena.py``), which checks that no marker crossed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from hub.client.realtime import encode_kind3
from tests.support.arena import (
    V1,
    V2,
    Arena,
    arena_on,
    expect_refused_join,
    free_name,
    handshake_status,
)
from tests.support.hubs import HubProcess

#: Variants of the victim's topic, built from the victim's org id ``v``
#: (after ``realtime:``, unless the variant says otherwise).
Variant = Callable[[str], str]

CASE = {
    "upper": lambda v: f"org:{v.upper()}",
    "capitalized": lambda v: f"org:{v.capitalize()}",
    "kind-upper": lambda v: f"ORG:{v}",
    "kind-title": lambda v: f"Org:{v}",
}
WHITESPACE = {
    "leading-space": lambda v: f"org: {v}",
    "trailing-space": lambda v: f"org:{v} ",
    "space-before-kind": lambda v: f" org:{v}",
    "tab": lambda v: f"org:{v}\t",
    "newline": lambda v: f"org:{v}\n",
    "crlf": lambda v: f"org:{v}\r\n",
    "nbsp": lambda v: f"org:{v}\u00a0",
    "zero-width-space": lambda v: f"org:\u200b{v}",
    "bom": lambda v: f"\ufefforg:{v}",
    "nul": lambda v: f"org:{v}\x00",
}
LOOKALIKES = {
    "cyrillic-o-in-kind": lambda v: f"\u043erg:{v}",
    "cyrillic-a": lambda v: f"org:{v[0]}\u0430{v[2:]}" if len(v) > 2 else f"org:\u0430{v}",
    "fullwidth-colon": lambda v: f"org\uff1a{v}",
    "fullwidth-kind": lambda v: f"\uff4f\uff52\uff47:{v}",
    "fullwidth-id": lambda v: "org:" + "".join(chr(ord(c) + 0xFEE0) for c in v),
    "combining-mark": lambda v: f"org:{v}\u0301",
    "kelvin-sign": lambda v: f"org:{v}\u212a",
    "greek-omicron": lambda v: f"\u03bfrg:{v}",
    "ratio-colon": lambda v: f"org\u2236{v}",
}
SEPARATORS = {
    "double-colon": lambda v: f"org::{v}",
    "trailing-colon": lambda v: f"org:{v}:",
    "empty-name-then-name": lambda v: f"org:{v}::x",
    "slash": lambda v: f"org/{v}",
    "dot": lambda v: f"org.{v}",
    "path-traversal": lambda v: f"org:x/../{v}",
    "percent-colon": lambda v: f"org%3A{v}",
    "percent-id": lambda v: f"org:%{v}",
    "query": lambda v: f"org:{v}?x=1",
    "fragment": lambda v: f"org:{v}#x",
    "semicolon": lambda v: f"org:{v};",
    "comma-list": lambda v: f"org:{v},org:x",
    "pipe": lambda v: f"org:{v}|x",
    "name-with-colon": lambda v: f"org:{v}:a:b",
    "no-prefix": lambda v: f"org:{v}",  # sent without realtime: (see below)
    "double-prefix": lambda v: f"realtime:org:{v}",
    "prefix-upper": lambda v: f"org:{v}",  # sent as REALTIME: (see below)
}
OVERLONG = {
    "id-65": lambda v: f"org:{v}{'x' * (65 - len(v))}",
    "name-65": lambda v: f"org:{v}:{'n' * 65}",
    "topic-10k": lambda v: f"org:{v}{'x' * 10_000}",
    "user-129": lambda v: f"user:{'u' * 129}",
}
WILDCARDS = {
    "star": lambda v: "org:*",
    "star-suffix": lambda v: f"org:{v[:3]}*",
    "percent": lambda v: "org:%",
    "underscore-like": lambda v: "org:_",
    "regex": lambda v: "org:.*",
    "plus": lambda v: "org:+",
    "hash": lambda v: "org:#",
    "gt": lambda v: "org:>",
    "question": lambda v: f"org:{v[:-1]}?",
    "brackets": lambda v: "org:[a-z]*",
    "braces": lambda v: f"org:{{{v},x}}",
    "bare-star": lambda v: "*",
    "empty": lambda v: "",
    "org-only": lambda v: "org",
    "org-colon": lambda v: "org:",
    "sub-star": lambda v: f"org:{v}:*",
}
MOTHER = {
    "mother": lambda v: "mother",
    "mother-upper": lambda v: "Mother",
    "mother-space": lambda v: "mother ",
    "mother-sub": lambda v: "mother:x",
    "mother-org": lambda v: f"mother:{v}",
    "user-of-victim": lambda v: f"user:{v}",
}

ALL: dict[str, Variant] = {
    **{f"case-{k}": f for k, f in CASE.items()},
    **{f"ws-{k}": f for k, f in WHITESPACE.items()},
    **{f"unicode-{k}": f for k, f in LOOKALIKES.items()},
    **{f"sep-{k}": f for k, f in SEPARATORS.items()},
    **{f"long-{k}": f for k, f in OVERLONG.items()},
    **{f"wild-{k}": f for k, f in WILDCARDS.items()},
    **{f"mother-{k}": f for k, f in MOTHER.items()},
}


def wire_topic(case: str, variant: Variant, victim: str) -> str:
    topic = variant(victim)
    if case == "sep-no-prefix":
        return topic
    if case == "sep-prefix-upper":
        return "REALTIME:" + topic
    return "realtime:" + topic


@pytest.fixture
def hub(hub_server: HubProcess) -> HubProcess:
    return hub_server


@pytest.mark.parametrize("group", ["case", "ws", "unicode", "sep", "long", "wild", "mother"])
async def test_hostile_topics_are_refused(hub: HubProcess, group: str) -> None:
    """Every variant of one group, each on a fresh attacker connection (so
    the per-socket join rate limit never answers instead of the policy), in
    both serializers; then the attacker also tries to publish to the
    variant and to the victim's real topic without a join."""
    async with arena_on(hub) as arena:
        cases = [(name, f) for name, f in ALL.items() if name.startswith(group + "-")]
        assert cases
        for index, (name, variant) in enumerate(cases):
            topic = wire_topic(name, variant, arena.victim_org)
            conn = await arena.attacker(vsn=V1 if index % 2 else V2)
            targets = [arena.victim_topics[0]]
            try:
                if free_name(topic):
                    # A channel of its own: joined, and the attacker's
                    # marker published there must reach no victim.
                    join_ref, reply = await conn.join(topic)
                    assert reply["status"] == "ok", reply
                    await conn.broadcast(topic, join_ref, {"m": conn.marker})
                elif topic == "realtime:":
                    await expect_refused_join(conn, topic, reason_prefix="TopicNameRequired")
                    targets.insert(0, topic)
                else:
                    await expect_refused_join(conn, topic)
                    targets.insert(0, topic)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {topic[:80]!r}: {exc}") from None
            for target in targets:
                reply = await conn.request(
                    target,
                    "broadcast",
                    {"type": "broadcast", "event": "x", "payload": {"m": conn.marker}},
                    join_ref="1",
                )
                assert reply == {"status": "error", "response": {"reason": "unmatched topic"}}
            await conn.heartbeat()
            await conn.close()


async def _quiet(arena: Arena, within: float = 0.5) -> None:
    """Let the victim's publisher run while the attackers listen."""
    await asyncio.sleep(within)


async def test_case_variant_membership_hears_nothing(hub: HubProcess) -> None:
    """A member of ``V1CT1M`` is not a member of ``v1ct1m``; on its own
    ``org:V1CT1M`` it hears nothing of the victim's ``org:v1ct1m``."""
    async with arena_on(hub) as arena:
        upper = arena.victim_org.upper()
        conn = await arena.attacker(arena.token([upper]), V2)
        await expect_refused_join(conn, arena.victim_topics[0])
        join_ref, reply = await conn.join(f"realtime:org:{upper}")
        assert reply["status"] == "ok", reply
        await conn.broadcast(f"realtime:org:{upper}", join_ref, {"m": conn.marker})
        await _quiet(arena)


async def test_prefix_org_membership_hears_nothing(hub: HubProcess) -> None:
    """A member of an org whose id is a prefix of the victim's (``vabc`` vs
    ``vabcdef``) gets nothing of the longer one, and vice versa."""
    async with arena_on(hub) as arena:
        prefix = arena.victim_org[:-3]
        conn = await arena.attacker(arena.token([prefix]), V1)
        await expect_refused_join(conn, arena.victim_topics[0])
        join_ref, reply = await conn.join(f"realtime:org:{prefix}")
        assert reply["status"] == "ok", reply
        await conn.broadcast(f"realtime:org:{prefix}", join_ref, {"m": conn.marker})
        await _quiet(arena)


async def test_own_sub_channel_named_after_victim_hears_nothing(hub: HubProcess) -> None:
    """``org:<attacker>:<victim>`` and ``org:<attacker>:inbox`` are the
    attacker's own channels: joinable, and separate from the victim's."""
    async with arena_on(hub) as arena:
        conn = await arena.attacker(vsn=V2)
        for name in (arena.victim_org, "inbox"):
            topic = f"realtime:org:{arena.attacker_org}:{name}"
            join_ref, reply = await conn.join(topic)
            assert reply["status"] == "ok", reply
            await conn.broadcast(topic, join_ref, {"m": conn.marker})
        await _quiet(arena)


@pytest.mark.parametrize(
    "orgs",
    [
        pytest.param(lambda v: [v + " "], id="trailing-space"),
        pytest.param(lambda v: [" " + v], id="leading-space"),
        pytest.param(lambda v: ["\u0430" + v[1:]], id="cyrillic"),
        pytest.param(lambda v: ["*"], id="star"),
        pytest.param(lambda v: [""], id="empty"),
        pytest.param(lambda v: [v + ":inbox"], id="with-separator"),
        pytest.param(lambda v: [v + "x" * 64], id="overlong"),
    ],
)
async def test_membership_claims_that_are_not_org_ids_refuse_the_token(
    hub: HubProcess, orgs: Callable[[str], list[str]]
) -> None:
    """A token whose membership list holds something that is not an org id
    (whitespace, look-alikes, wildcards, separators, overlong) is refused
    whole: 401 at the handshake, InvalidJWTToken as a join's token."""
    async with arena_on(hub) as arena:
        token = arena.token(orgs(arena.victim_org))
        assert await handshake_status(hub, token) == 401
        conn = await arena.attacker(vsn=V1)
        for topic in arena.victim_topics:
            await expect_refused_join(
                conn, topic, reason_prefix="InvalidJWTToken", access_token=token
            )


async def test_binary_broadcast_to_victim_topic_is_refused(hub: HubProcess) -> None:
    """A vsn 2.0.0 kind-3 broadcast naming the victim's topic, sent with the
    join_ref of the attacker's own channel, is refused (unmatched topic)."""
    async with arena_on(hub) as arena:
        conn = await arena.attacker(vsn=V2)
        own = f"realtime:org:{arena.attacker_org}"
        join_ref, reply = await conn.join(own)
        assert reply["status"] == "ok", reply
        payload = f'{{"m": "{conn.marker}"}}'.encode()
        for topic in arena.victim_topics:
            await conn.client.send_raw(encode_kind3(join_ref, "77", topic, "x", payload))
            msg = await conn.wait_for(lambda m: m.event == "phx_reply" and m.ref == "77")
            assert msg.payload == {"status": "error", "response": {"reason": "unmatched topic"}}
            conn.messages.remove(msg)
        await conn.heartbeat()
