"""Every REST endpoint, aimed at the victim org, without a token, with a
foreign org's token and with an expired one (plus a few header tricks).

Expected answers: no token, a garbage token or an expired one: 401; a valid
token of another org: 403; and in every case nothing is published to the
victim's subscribers, nothing is appended to its history, and no response
body carries any of its data (checked by the arena,
``tests/support/arena.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support.arena import V2, Arena, T, arena_on, free_name
from tests.support.hubs import HubProcess


@pytest.fixture
def hub(hub_server: HubProcess) -> HubProcess:
    return hub_server


@dataclass(frozen=True)
class Endpoint:
    id: str
    method: str
    path: Callable[[Arena], str]
    body: Callable[[Arena], Any] | None = None


def _messages(arena: Arena) -> Any:
    message = {
        "topic": f"org:{arena.victim_org}",
        "event": "x",
        "payload": {"m": arena.attacker_marker},
    }
    inbox = {**message, "topic": f"org:{arena.victim_org}:inbox"}
    return {"messages": [message, inbox]}


ENDPOINTS = [
    Endpoint("rest-broadcast", "POST", lambda a: "/realtime/v1/api/broadcast", _messages),
    Endpoint("api-broadcast", "POST", lambda a: "/api/broadcast", _messages),
    Endpoint(
        "broadcast-one",
        "POST",
        lambda a: f"/realtime/v1/api/broadcast/org:{a.victim_org}/events/x",
        lambda a: {"m": a.attacker_marker},
    ),
    Endpoint(
        "events-post",
        "POST",
        lambda a: f"/api/orgs/{a.victim_org}/events",
        lambda a: [{"type": "x", "payload": {"m": a.attacker_marker}}],
    ),
    Endpoint("events-get", "GET", lambda a: f"/api/orgs/{a.victim_org}/events?after=0&limit=1000"),
    Endpoint("mother-stats", "GET", lambda a: "/api/mother/stats"),
]

#: auth variant -> (headers for the arena, expected status)
AUTH: dict[str, tuple[Callable[[Arena], dict[str, str]], int]] = {
    "no-token": (lambda a: {}, 401),
    "empty-bearer": (lambda a: {"Authorization": "Bearer"}, 401),
    "garbage-bearer": (lambda a: {"Authorization": "Bearer abc.def.ghi"}, 401),
    "foreign": (lambda a: {"Authorization": f"Bearer {a.attacker_token()}"}, 403),
    "foreign-apikey-header": (lambda a: {"apikey": a.attacker_token()}, 403),
    "foreign-lowercase-scheme": (lambda a: {"Authorization": f"bearer {a.attacker_token()}"}, 403),
    "expired-victim-member": (
        lambda a: {"Authorization": f"Bearer {a.victim_token(ttl=-10)}"},
        401,
    ),
    "expired-victim-apikey": (lambda a: {"apikey": a.victim_token(ttl=-10)}, 401),
    "expired-service-role": (
        lambda a: {"Authorization": f"Bearer {a.admin_token(ttl=-10)}"},
        401,
    ),
    "foreign-bearer-beats-expired-apikey": (
        lambda a: {
            "Authorization": f"Bearer {a.attacker_token()}",
            "apikey": a.victim_token(ttl=-10),
        },
        403,
    ),
}


async def _route_exists(arena: Arena, endpoint: Endpoint) -> bool:
    """Whether the hub serves ``endpoint`` at all (asked as service_role)."""
    if endpoint.id != "mother-stats":
        return True
    # Not through arena.http: an admin may read everything, that is no leak.
    async with httpx.AsyncClient(base_url=arena.hub.http_url, timeout=T) as http:
        response = await http.get(
            "/api/mother/stats", headers={"Authorization": f"Bearer {arena.admin_token()}"}
        )
    return response.status_code != 404


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.id)
async def test_endpoint_refuses_outsiders(hub: HubProcess, endpoint: Endpoint) -> None:
    async with arena_on(hub) as arena:
        exists = await _route_exists(arena, endpoint)
        for name, (headers, expected) in AUTH.items():
            body = endpoint.body(arena) if endpoint.body else None
            response = await arena.http(
                endpoint.method, endpoint.path(arena), headers=headers(arena), json=body
            )
            want = expected if exists else 404
            assert response.status_code == want, (name, response.status_code, response.text)
            if response.status_code in (401, 403):
                assert "message" in response.json(), response.text
        await asyncio.sleep(0.2)


async def test_mixed_batch_is_all_or_nothing(hub: HubProcess) -> None:
    """A REST broadcast whose messages name the attacker's own topic and the
    victim's is refused whole (403): not even the attacker's own subscriber
    hears the first message."""
    async with arena_on(hub) as arena:
        own = await arena.attacker(vsn=V2)
        topic = f"realtime:org:{arena.attacker_org}"
        _, reply = await own.join(topic)
        assert reply["status"] == "ok"
        mine = {"topic": f"org:{arena.attacker_org}", "event": "x", "payload": {"n": "mine"}}
        theirs = {"topic": f"org:{arena.victim_org}", "event": "x", "payload": {"m": "x"}}
        response = await arena.http(
            "POST",
            "/realtime/v1/api/broadcast",
            token=arena.attacker_token(),
            json={"messages": [mine, theirs]},
        )
        assert response.status_code == 403, response.text
        await asyncio.sleep(0.3)
        assert not [m for m in own.messages if m.event == "broadcast"], own.messages


@pytest.mark.parametrize(
    "topic",
    [
        lambda v: f"org:{v.upper()}",
        lambda v: f" org:{v}",
        lambda v: f"org:{v} ",
        lambda v: f"realtime:org:{v}",
        lambda v: f"org:{v}:inbox",
        lambda v: f"org:\u0430{v[1:]}",
        lambda v: f"org\uff1a{v}",
        lambda v: "org:*",
        lambda v: "mother",
        lambda v: f"user:{v}",
        lambda v: f"org:{v}\x00",
    ],
    ids=[
        "upper",
        "leading-space",
        "trailing-space",
        "prefixed",
        "sub-channel",
        "cyrillic",
        "fullwidth-colon",
        "wildcard",
        "mother",
        "user",
        "nul",
    ],
)
async def test_rest_broadcast_topic_variants(hub: HubProcess, topic: Callable[[str], str]) -> None:
    """Spelling the victim's topic differently over REST is refused (403 or
    422) by both broadcast routes, unless the spelling is a free name: then
    it is a channel of its own (202), and the arena checks that the
    attacker's marker reached no victim."""
    async with arena_on(hub) as arena:
        name = topic(arena.victim_org)
        message = {"topic": name, "event": "x", "payload": {"m": arena.attacker_marker}}
        response = await arena.http(
            "POST",
            "/realtime/v1/api/broadcast",
            token=arena.attacker_token(),
            json={"messages": [message]},
        )
        free = free_name("realtime:" + name)
        assert response.status_code in ((202,) if free else (403, 422)), response.text
        response = await arena.http(
            "POST",
            f"/realtime/v1/api/broadcast/{quote(name, safe=':*')}/events/x",
            token=arena.attacker_token(),
            json={"m": arena.attacker_marker},
        )
        assert response.status_code in ((202,) if free else (403, 404, 422)), response.text


@pytest.mark.parametrize(
    "path",
    [
        lambda v: f"/api/orgs/{v.upper()}/events",
        lambda v: f"/api/orgs/{v}%20/events",
        lambda v: f"/api/orgs/%20{v}/events",
        lambda v: f"/api/orgs/{v}%00/events",
        lambda v: f"/api/orgs/x%2F..%2F{v}/events",
        lambda v: "/api/orgs/*/events",
        lambda v: f"/api/orgs/\u0430{v[1:]}/events",
        lambda v: f"/api/orgs/{v}/events/",
        lambda v: f"/api/orgs/{v}:inbox/events",
    ],
    ids=[
        "upper",
        "trailing-space",
        "leading-space",
        "nul",
        "encoded-traversal",
        "wildcard",
        "cyrillic",
        "trailing-slash",
        "sub-channel",
    ],
)
async def test_events_path_variants(hub: HubProcess, path: Callable[[str], str]) -> None:
    """Spelling the victim's org differently in the events path reads and
    writes nothing of the victim (any 4xx; the arena checks the history)."""
    async with arena_on(hub) as arena:
        url = path(arena.victim_org)
        for method, body in (("GET", None), ("POST", {"type": "x", "payload": {"m": "x"}})):
            response = await arena.http(method, url, token=arena.attacker_token(), json=body)
            assert 400 <= response.status_code < 500, (method, response.text)


async def test_org_in_the_body_does_not_redirect_an_append(hub: HubProcess) -> None:
    """The org of an appended event is the one in the path, whatever the
    body says: the attacker's append lands in its own history only."""
    async with arena_on(hub) as arena:
        body = {
            "type": "x",
            "org": arena.victim_org,
            "payload": {"org": arena.victim_org, "m": arena.attacker_marker},
        }
        response = await arena.http(
            "POST",
            f"/api/orgs/{arena.attacker_org}/events",
            token=arena.attacker_token(),
            json=body,
        )
        assert response.status_code == 201, response.text
        # (The arena then checks that the victim's history is unchanged.)


async def test_publisher_hanging_up_mid_body_is_not_an_error(make_hub: Any) -> None:
    """A publisher that sends half a body and disconnects (cancelled,
    timed out) appends and publishes nothing, and the hub logs no
    traceback: it is a normal event, not a server error."""
    hub = make_hub()
    org = "org-hangup"
    token = hub.token(orgs=[org])
    paths = [
        f"/api/orgs/{org}/events",
        "/realtime/v1/api/broadcast",
        f"/realtime/v1/api/broadcast/org:{org}/events/x",
    ]
    for path in paths:
        _reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"type": "half'
            ).encode()
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is now waiting for the rest
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=T) as http:
        history = await http.get(
            f"/api/orgs/{org}/events", headers={"Authorization": f"Bearer {token}"}
        )
    assert history.status_code == 200, history.text
    assert history.json()["events"] == []
    assert "Traceback" not in hub.log(), hub.log()
