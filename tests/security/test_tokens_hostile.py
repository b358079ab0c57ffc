"""Hostile JWTs, tried at every place a token enters the hub: the handshake's
``apikey``, a join's ``access_token``, a later ``access_token`` message, and
the REST API.

The hub under test has both ``HUB_JWT_SECRET`` and ``HUB_JWKS_URL`` (an RS256
key served from a local ``http.server``) and ``HUB_JWT_AUDIENCE=authenticated``.

Two kinds of hostile token:

* **refused**: forged or malformed tokens (``alg: none``, HS/RS confusion,
  wrong keys, tampered claims, wrong or missing ``aud``, expired,
  not-yet-valid, oversized, claims of the wrong type).  Each claims
  membership of the victim org.  The handshake answers 401, a join carrying
  it gets ``InvalidJWTToken`` (even for the attacker's own org: no fallback
  to the connection's token), an ``access_token`` message ends the channel
  (``system`` error, then ``phx_close``), REST answers 401.
* **no access**: validly signed tokens that smuggle membership or admin
  rights through places the hub must not read (``user_metadata``, top-level
  claims, a dotted key, a role of the wrong case, a string ``"true"``).  They
  connect, but joins of the victim's topics and of ``mother`` are refused
  with ``Unauthorized``, REST answers 403.

Every case runs in an arena (see ``tests/support/arena.py``): nothing of
the victim reaches the attacker and nothing of the attacker reaches the
victim.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.warnings import InsecureKeyLengthWarning

from tests.support.arena import (
    V1,
    V2,
    Arena,
    Conn,
    arena_on,
    b64url,
    claims_for,
    expect_refused_join,
    forge,
    handshake_status,
    hs256,
)
from tests.support.hubs import HubProcess, free_port, start_hub, stop_hub

KID = "k1"


@dataclass(frozen=True)
class Keys:
    legit: rsa.RSAPrivateKey
    attacker: rsa.RSAPrivateKey
    attacker_ec: ec.EllipticCurvePrivateKey

    @property
    def public_pem(self) -> bytes:
        return self.legit.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def public_der(self) -> bytes:
        return self.legit.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, key: rsa.RSAPublicKey, kid: str | None = KID) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        value.update(alg="RS256", use="sig")
        if kid is not None:
            value["kid"] = kid
        return value


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        legit=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        attacker=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        attacker_ec=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture(scope="module")
def jwks_url(keys: Keys) -> Iterator[str]:
    document = json.dumps({"keys": [keys.jwk(keys.legit.public_key())]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def token_hub(tmp_path_factory: pytest.TempPathFactory, jwks_url: str) -> Iterator[HubProcess]:
    hub = start_hub(
        tmp_path_factory.mktemp("tokens"),
        {
            "HUB_JWKS_URL": jwks_url,
            "HUB_JWT_AUDIENCE": "authenticated",
            "HUB_JWKS_MIN_REFRESH": "1",
        },
    )
    yield hub
    stop_hub(hub)


@dataclass(frozen=True)
class Ctx:
    arena: Arena
    keys: Keys
    secret: str

    @property
    def both(self) -> list[str]:
        """The victim's org and the attacker's own."""
        return [self.arena.victim_org, self.arena.attacker_org]

    def claims(self, **changes: Any) -> dict[str, Any]:
        claims = claims_for(self.both)
        for name, value in changes.items():
            if value is _DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def signed(self, claims: dict[str, Any], alg: str = "HS256") -> str:
        """Signed with the hub's real secret: a token the issuer made."""
        with warnings.catch_warnings():
            # HS384/HS512 with a 43-byte secret: short for those, on purpose.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return jwt.encode(claims, self.secret, algorithm=alg)

    def with_orgs(self, orgs: Any) -> str:
        claims = self.claims()
        claims["app_metadata"] = {"orgs": orgs}
        return self.signed(claims)

    def smuggled(self, **extra: Any) -> str:
        """A valid attacker token (member of its own org only) plus ``extra``."""
        claims = claims_for([self.arena.attacker_org])
        claims.update(extra)
        return self.signed(claims)


_DROP = object()


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], str]
    refused: bool  # False: valid token that must grant nothing of the victim's


def _tampered(ctx: Ctx) -> str:
    """A real attacker token whose claims were edited to add the victim org;
    the original signature is kept."""
    head, _, sig = ctx.signed(claims_for([ctx.arena.attacker_org])).split(".")
    body = forge({}, ctx.claims()).split(".")[1]
    return f"{head}.{body}.{sig}"


def _rs256_raw(header: dict[str, Any], ctx: Ctx) -> str:
    """RS256 by the attacker's key over any header (PyJWT refuses odd ones)."""
    unsigned = forge(header, ctx.claims()).rsplit(".", 1)[0]
    signature = ctx.keys.attacker.sign(unsigned.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{unsigned}.{b64url(signature)}"


def _pem_no_newline(ctx: Ctx) -> bytes:
    return ctx.keys.public_pem.strip()


REFUSED = [
    Case("alg-none", lambda c: forge({"alg": "none", "typ": "JWT"}, c.claims()), True),
    Case("alg-None", lambda c: forge({"alg": "None", "typ": "JWT"}, c.claims()), True),
    Case("alg-NONE", lambda c: forge({"alg": "NONE"}, c.claims()), True),
    Case("alg-missing", lambda c: forge({"typ": "JWT"}, c.claims(), os.urandom(32)), True),
    Case(
        "alg-none-with-kid",
        lambda c: forge({"alg": "none", "kid": KID}, c.claims()),
        True,
    ),
    Case(
        "hs-rs-confusion-pem",
        lambda c: hs256({"alg": "HS256", "typ": "JWT", "kid": KID}, c.claims(), c.keys.public_pem),
        True,
    ),
    Case(
        "hs-rs-confusion-pem-stripped",
        lambda c: hs256({"alg": "HS256", "typ": "JWT"}, c.claims(), _pem_no_newline(c)),
        True,
    ),
    Case(
        "hs-rs-confusion-der",
        lambda c: hs256({"alg": "HS256", "typ": "JWT"}, c.claims(), c.keys.public_der),
        True,
    ),
    Case(
        "hs-rs-confusion-jwk-json",
        lambda c: hs256(
            {"alg": "HS256", "kid": KID},
            c.claims(),
            json.dumps(c.keys.jwk(c.keys.legit.public_key())).encode(),
        ),
        True,
    ),
    Case(
        "rs256-attacker-key-known-kid",
        lambda c: jwt.encode(c.claims(), c.keys.attacker, "RS256", headers={"kid": KID}),
        True,
    ),
    Case(
        "rs256-attacker-key-unknown-kid",
        lambda c: jwt.encode(c.claims(), c.keys.attacker, "RS256", headers={"kid": "evil"}),
        True,
    ),
    Case(
        "rs256-attacker-key-no-kid",
        lambda c: jwt.encode(c.claims(), c.keys.attacker, "RS256"),
        True,
    ),
    Case(
        "rs256-embedded-jwk-header",
        lambda c: jwt.encode(
            c.claims(),
            c.keys.attacker,
            "RS256",
            headers={"jwk": c.keys.jwk(c.keys.attacker.public_key(), kid=None)},
        ),
        True,
    ),
    Case(
        "rs256-jku-header",
        lambda c: jwt.encode(
            c.claims(),
            c.keys.attacker,
            "RS256",
            headers={"kid": "jku-key", "jku": "http://127.0.0.1:9/evil.json"},
        ),
        True,
    ),
    Case(
        "es256-claiming-the-rsa-kid",
        lambda c: jwt.encode(c.claims(), c.keys.attacker_ec, "ES256", headers={"kid": KID}),
        True,
    ),
    Case("kid-not-a-string", lambda c: _rs256_raw({"alg": "RS256", "kid": 1}, c), True),
    Case(
        "hs256-wrong-secret",
        lambda c: jwt.encode(c.claims(), "another-secret-of-enough-length-0123456789", "HS256"),
        True,
    ),
    Case("hs512-real-secret", lambda c: c.signed(c.claims(), "HS512"), True),
    Case("hs384-real-secret", lambda c: c.signed(c.claims(), "HS384"), True),
    Case("claims-tampered-signature-kept", _tampered, True),
    Case("signature-stripped", lambda c: c.signed(c.claims()).rsplit(".", 1)[0] + ".", True),
    Case("extra-segment", lambda c: c.signed(c.claims()) + ".e30", True),
    Case("not-a-jwt", lambda c: "not-a-jwt", True),
    Case("aud-other", lambda c: c.signed(c.claims(aud="other-service")), True),
    Case("aud-case", lambda c: c.signed(c.claims(aud="Authenticated")), True),
    Case("aud-missing", lambda c: c.signed(c.claims(aud=_DROP)), True),
    Case("aud-list-without", lambda c: c.signed(c.claims(aud=["anon", "x"])), True),
    Case("aud-number", lambda c: c.signed(c.claims(aud=42)), True),
    Case("expired", lambda c: c.signed(c.claims(exp=int(time.time()) - 5)), True),
    Case("expired-long-ago", lambda c: c.signed(c.claims(exp=1_000_000_000)), True),
    Case("nbf-future", lambda c: c.signed(c.claims(nbf=int(time.time()) + 3600)), True),
    Case("exp-missing", lambda c: c.signed(c.claims(exp=_DROP)), True),
    Case("role-missing", lambda c: c.signed(c.claims(role=_DROP)), True),
    Case("huge-claims", lambda c: c.signed(c.claims(pad="x" * 9000)), True),
    Case(
        "huge-header",
        lambda c: jwt.encode(c.claims(), c.secret, "HS256", headers={"x": "y" * 9000}),
        True,
    ),
    Case("role-number", lambda c: c.signed(c.claims(role=123)), True),
    Case("role-empty", lambda c: c.signed(c.claims(role="")), True),
    Case("role-list", lambda c: c.signed(c.claims(role=["service_role"])), True),
    Case("exp-string", lambda c: c.signed(c.claims(exp="99999999999")), True),
    Case("exp-bool", lambda c: c.signed(c.claims(exp=True)), True),
    Case("exp-null", lambda c: c.signed(c.claims(exp=None)), True),
    Case("sub-number", lambda c: c.signed(c.claims(sub=42)), True),
    Case("orgs-string", lambda c: c.with_orgs(c.arena.victim_org), True),
    Case("orgs-map-of-numbers", lambda c: c.with_orgs({c.arena.victim_org: 1}), True),
    Case("orgs-nested-list", lambda c: c.with_orgs([[c.arena.victim_org]]), True),
    Case("orgs-with-null", lambda c: c.with_orgs([c.arena.victim_org, None]), True),
    Case("orgs-number", lambda c: c.with_orgs(7), True),
    Case("orgs-trailing-space", lambda c: c.with_orgs([c.arena.victim_org + " "]), True),
    Case("orgs-wildcard", lambda c: c.with_orgs(["*"]), True),
    Case("orgs-lookalike", lambda c: c.with_orgs(["v\u0430" + c.arena.victim_org[1:]]), True),
]

NO_ACCESS = [
    Case(
        "user-metadata-orgs",
        lambda c: c.smuggled(user_metadata={"orgs": [c.arena.victim_org]}),
        False,
    ),
    Case(
        "user-metadata-app-metadata",
        lambda c: c.smuggled(user_metadata={"app_metadata": {"orgs": [c.arena.victim_org]}}),
        False,
    ),
    Case(
        "user-metadata-admin-and-role",
        lambda c: c.smuggled(user_metadata={"hub_admin": True, "role": "service_role"}),
        False,
    ),
    Case("top-level-orgs", lambda c: c.smuggled(orgs=[c.arena.victim_org]), False),
    Case(
        "dotted-claim-key",
        lambda c: c.smuggled(**{"app_metadata.orgs": [c.arena.victim_org]}),
        False,
    ),
    Case(
        "admin-claim-as-string",
        lambda c: c.smuggled(app_metadata={"orgs": [c.arena.attacker_org], "hub_admin": "true"}),
        False,
    ),
    Case("role-service-wrong-case", lambda c: c.smuggled(role="Service_Role"), False),
    Case("role-service-trailing-space", lambda c: c.smuggled(role="service_role "), False),
    Case(
        "orgs-case-variant",
        lambda c: c.smuggled(app_metadata={"orgs": [c.arena.victim_org.upper()]}),
        False,
    ),
    Case("app-metadata-not-an-object", lambda c: c.smuggled(app_metadata="x"), False),
]


async def _handshake(ctx: Ctx, case: Case, token: str) -> None:
    hub = ctx.arena.hub
    if case.id.startswith("huge-"):
        # A token this big makes the request line pass 8 KiB: see
        # test_oversized_handshake_is_answered.
        return
    if case.refused:
        for vsn in (V1, V2):
            status = await handshake_status(hub, token, vsn)
            assert 400 <= status < 500 and status in (400, 401, 414, 431), status
        return
    conn = await ctx.arena.attacker(token, V2)
    await conn.heartbeat()
    for topic in (*ctx.arena.victim_topics, "realtime:mother"):
        await expect_refused_join(conn, topic)


async def _join_access_token(ctx: Ctx, case: Case, token: str) -> None:
    conn = await ctx.arena.attacker()
    prefix = "InvalidJWTToken" if case.refused else "Unauthorized"
    for topic in ctx.arena.victim_topics:
        await expect_refused_join(conn, topic, reason_prefix=prefix, access_token=token)
    await expect_refused_join(conn, "realtime:mother", reason_prefix=prefix, access_token=token)
    if case.refused:
        # Not even the attacker's own org: a bad channel token never falls
        # back to the connection's.
        own = f"realtime:org:{ctx.arena.attacker_org}"
        await expect_refused_join(conn, own, reason_prefix="InvalidJWTToken", access_token=token)
    await conn.heartbeat()


async def _access_token_message(ctx: Ctx, case: Case, token: str) -> None:
    conn = await ctx.arena.attacker(vsn=V2)
    own = f"realtime:org:{ctx.arena.attacker_org}"
    join_ref, reply = await conn.join(own)
    assert reply["status"] == "ok", reply
    await conn.send(own, "access_token", {"access_token": token}, None, join_ref)
    if case.refused:
        system = await conn.wait_for(lambda m: m.event == "system" and m.topic == own)
        assert system.payload["status"] == "error", system
        await conn.wait_for(lambda m: m.event == "phx_close" and m.topic == own)
        # The channel is gone: nothing more can be sent on it.
        reply = await conn.request(
            own, "broadcast", {"type": "broadcast", "event": "x", "payload": {}}, join_ref
        )
        assert reply["status"] == "error", reply
    # Whatever happened to its own channel, the victim's stay closed to it.
    for topic in ctx.arena.victim_topics:
        await conn.send(
            topic,
            "access_token",
            {"access_token": token},
            None,
            join_ref,
        )
        reply = await conn.request(
            topic,
            "broadcast",
            {"type": "broadcast", "event": "x", "payload": {"m": conn.marker}},
            join_ref,
        )
        assert reply == {"status": "error", "response": {"reason": "unmatched topic"}}, reply
    await conn.heartbeat()


async def _rest(ctx: Ctx, case: Case, token: str) -> None:
    arena = ctx.arena
    expected = 401 if case.refused else 403
    response = await arena.http("GET", f"/api/orgs/{arena.victim_org}/events", token=token)
    assert response.status_code == expected, response.text
    response = await arena.http(
        "POST",
        f"/api/orgs/{arena.victim_org}/events",
        token=token,
        json={"type": "x", "payload": {"m": arena.attacker_marker}},
    )
    assert response.status_code == expected, response.text
    message = {
        "topic": f"org:{arena.victim_org}",
        "event": "x",
        "payload": {"m": arena.attacker_marker},
    }
    response = await arena.http(
        "POST", "/realtime/v1/api/broadcast", token=token, json={"messages": [message]}
    )
    assert response.status_code == expected, response.text


@pytest.mark.parametrize("case", REFUSED + NO_ACCESS, ids=lambda case: case.id)
async def test_hostile_token(token_hub: HubProcess, keys: Keys, case: Case) -> None:
    async with arena_on(token_hub, aud="authenticated") as arena:
        ctx = Ctx(arena, keys, token_hub.secret)
        token = case.build(ctx)
        await _handshake(ctx, case, token)
        await _join_access_token(ctx, case, token)
        await _access_token_message(ctx, case, token)
        await _rest(ctx, case, token)


async def test_controls_legit_tokens_work(token_hub: HubProcess, keys: Keys) -> None:
    """The paths the hostile cases attack do work for honest tokens, so their
    refusals mean something: an RS256 token from the JWKS key and an HS256
    token from the secret both join the victim org."""
    async with arena_on(token_hub, aud="authenticated") as arena:
        claims = claims_for([arena.victim_org], sub=arena.victim_sub)
        rs256 = jwt.encode(claims, keys.legit, "RS256", headers={"kid": KID})
        hs = jwt.encode(claims, token_hub.secret, "HS256")
        for token in (rs256, hs):
            conn = await Conn.open(token_hub, token, V2, "honest")
            _, reply = await conn.join(arena.victim_topics[0])
            assert reply["status"] == "ok", reply
            await conn.wait_for(lambda m: arena.victim_marker in json.dumps(m.payload))
            await conn.close()


async def test_access_token_cannot_move_a_channel_to_another_org(token_hub: HubProcess) -> None:
    """A valid token of *another* user who is a victim member, sent as an
    ``access_token`` on the attacker's channel, re-authorizes only that
    channel's own topic: the attacker's channel stays on the attacker's org
    and hears nothing of the victim."""
    async with arena_on(token_hub, aud="authenticated") as arena:
        conn = await arena.attacker(vsn=V1)
        own = f"realtime:org:{arena.attacker_org}"
        join_ref, reply = await conn.join(own)
        assert reply["status"] == "ok"
        await conn.send(own, "access_token", {"access_token": arena.victim_token()}, None, join_ref)
        await conn.wait_for(lambda m: m.event == "phx_close" and m.topic == own)
        await expect_refused_join(conn, arena.victim_topics[0])


async def test_oversized_handshake_is_answered(token_hub: HubProcess) -> None:
    """A handshake whose ``apikey`` makes the request line longer than 8 KiB
    (the hub refuses tokens over 8 KiB anyway) must get an HTTP error answer
    promptly, not a socket left open without a word.

    HUB BUG (found by this suite): the websockets parser under uvicorn's
    sans-I/O protocol refuses the over-long request line, and nobody answers or
    closes the connection; the client waits until its own timeout and the hub
    holds the socket as long as the client likes.
    """
    async with arena_on(token_hub, aud="authenticated") as arena:
        claims = claims_for([arena.victim_org, arena.attacker_org])
        claims["pad"] = "x" * 9000
        token = jwt.encode(claims, token_hub.secret, "HS256")
        status = await handshake_status(token_hub, token)
        assert 400 <= status < 500, status
