"""Token verification: HS256 with the shared secret, ES256/RS256 via JWKS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import json
import os
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from hub.auth.tokens import MAX_TOKEN_BYTES, JwksCache, KeyNotCached, TokenVerifier, issue_token
from hub.errors import AuthError, ConfigError

# 64 bytes: long enough for PyJWT's HS512 key-length warning too.
SECRET = b"unit-test-secret-that-is-long-enough-for-every-hmac-0123456789ab"
OTHER_SECRET = b"another-secret-that-is-also-long-enough-for-every-hmac-987654321"
ORGS = ("app_metadata", "orgs")

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    value: dict[str, Any] = {
        "role": "authenticated",
        "sub": "user-1",
        "iat": now,
        "exp": now + 3600,
        "app_metadata": {"orgs": ["42"]},
    }
    value.update(extra)
    return {k: v for k, v in value.items() if v is not None}


def hs256(secret: bytes = SECRET, headers: dict[str, Any] | None = None, **extra: Any) -> str:
    return jwt.encode(claims(**extra), secret, algorithm="HS256", headers=headers)


def es256(kid: str | None = "ec-1", key: Any = EC_KEY, **extra: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**extra), key, algorithm="ES256", headers=headers)


def rs256(kid: str | None = "rsa-1", **extra: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**extra), RSA_KEY, algorithm="RS256", headers=headers)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature))
    )


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = ECAlgorithm if alg == "ES256" else RSAAlgorithm
    value: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)  # type: ignore[attr-defined]
    value.update({"kid": kid, "alg": alg, "use": "sig"})
    return value


EC_JWK = jwk(EC_KEY, "ec-1", "ES256")
RSA_JWK = jwk(RSA_KEY, "rsa-1", "RS256")


def verifier(
    secret: bytes | None = SECRET, jwks: JwksCache | None = None, audience: str | None = None
) -> TokenVerifier:
    return TokenVerifier(secret=secret, jwks=jwks, orgs_claim=ORGS, audience=audience)


def refused(v: TokenVerifier, token: object, now: float | None = None) -> AuthError:
    with pytest.raises(AuthError) as info:
        v.verify(token, now)
    assert info.value.code == "InvalidJWTToken"
    return info.value


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cache_with(*keys: dict[str, Any]) -> JwksCache:
    """A JwksCache holding ``keys`` without any network."""
    cache = JwksCache("http://127.0.0.1:9/unused")
    cache._keys = {key["kid"]: jwt.PyJWK(key) for key in keys}
    return cache


# -- a JWKS document served from a local thread ------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.document: Any = {"keys": [EC_JWK, RSA_JWK]}
        self.status = 200
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/auth/v1/.well-known/jwks.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


# -- HS256 ---------------------------------------------------------------------


def test_hs256_valid() -> None:
    principal = verifier().verify(hs256())
    assert principal.role == "authenticated"
    assert principal.sub == "user-1"
    assert dict(principal.orgs) == {"42": "member"}


def test_issue_token_round_trip() -> None:
    token = issue_token(SECRET, sub="u", orgs={"7": "admin"}, ttl=60)
    principal = verifier(audience="authenticated").verify(token)
    assert principal.sub == "u"
    assert dict(principal.orgs) == {"7": "admin"}
    assert time.time() < principal.exp <= time.time() + 61
    service = verifier().verify(issue_token(SECRET, sub=None, role="service_role"))
    assert service.is_service


def test_wrong_secret() -> None:
    error = refused(verifier(), hs256(OTHER_SECRET))
    assert error.message == "Failed to validate JWT signature"


def test_tampered_payload() -> None:
    header, _, signature = hs256().split(".")
    forged = b64(json.dumps(claims(app_metadata={"orgs": ["43"]})).encode())
    error = refused(verifier(), f"{header}.{forged}.{signature}")
    assert error.message == "Failed to validate JWT signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_is_refused(alg: str) -> None:
    token = unsigned({"alg": alg, "typ": "JWT"}, claims())
    error = refused(verifier(), token)
    assert "not accepted" in error.message or "not a valid JWT" in error.message


def test_alg_none_with_a_signature_is_refused() -> None:
    token = unsigned({"alg": "none"}, claims(), signature=b"anything")
    refused(verifier(), token)
    refused(verifier(secret=None, jwks=cache_with(EC_JWK)), token)


def test_missing_alg_is_refused() -> None:
    refused(verifier(), unsigned({"typ": "JWT"}, claims(), b"x"))


@pytest.mark.parametrize("alg", ["HS384", "HS512", "PS256", "ES384", "EdDSA"])
def test_other_algorithms_are_refused(alg: str) -> None:
    error = refused(verifier(jwks=cache_with(EC_JWK)), unsigned({"alg": alg}, claims(), b"sig"))
    assert error.message == f"Signing algorithm {alg!r} is not accepted"


def test_hs384_really_signed_with_the_secret_is_refused() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS384")
    assert "not accepted" in refused(verifier(), token).message


def test_asymmetric_token_without_jwks_is_refused() -> None:
    assert "not accepted" in refused(verifier(), es256()).message
    assert "not accepted" in refused(verifier(), rs256()).message


def test_hs256_without_secret_is_refused() -> None:
    v = verifier(secret=None, jwks=cache_with(EC_JWK))
    assert refused(v, hs256()).message == "Signing algorithm 'HS256' is not accepted"


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def confused_token(key: Any, kid: str) -> tuple[str, bytes]:
    """An HS256 token whose HMAC key is the public key's PEM: what an
    attacker signs when hoping the server feeds its RS/ES public key to
    HMAC verification."""
    pem = public_pem(key)
    signing_input = ".".join(
        (
            b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()),
            b64(json.dumps(claims(role="service_role")).encode()),
        )
    )
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}", pem


@pytest.mark.parametrize(("key", "kid"), [(RSA_KEY, "rsa-1"), (EC_KEY, "ec-1")])
def test_algorithm_confusion_with_public_key_pem_is_refused(key: Any, kid: str) -> None:
    token, pem = confused_token(key, kid)
    # The forgery is well made: it is a valid HMAC under the public PEM.
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert b64(expected) == signature
    jwks = cache_with(EC_JWK, RSA_JWK)
    assert refused(verifier(jwks=jwks), token).message == "Failed to validate JWT signature"
    assert "not accepted" in refused(verifier(secret=None, jwks=jwks), token).message


def test_expired_token_message_counts_seconds() -> None:
    exp = int(time.time()) - 100
    token = hs256(exp=exp)
    assert refused(verifier(), token, now=exp + 100).message == "Token has expired 100 seconds ago"
    message = refused(verifier(), token).message
    assert message.startswith("Token has expired ")
    assert message.endswith(" seconds ago")
    assert 99 <= int(message.split()[3]) <= 105


def test_nbf_in_the_future() -> None:
    token = hs256(nbf=int(time.time()) + 600)
    assert refused(verifier(), token).message == "Token is not yet valid"


def test_iat_is_not_required_but_exp_and_role_are() -> None:
    assert verifier().verify(hs256(iat=None)).role == "authenticated"
    for missing in ("role", "exp"):
        token = hs256(**{missing: None})
        assert refused(verifier(), token).message == "Fields `role` and `exp` are required in JWT"


def test_audience_required_when_configured() -> None:
    v = verifier(audience="authenticated")
    assert v.verify(hs256(aud="authenticated")).sub == "user-1"
    assert v.verify(hs256(aud=["other", "authenticated"])).sub == "user-1"
    assert refused(v, hs256(aud="other")).message == "Invalid audience"
    assert refused(v, hs256(aud=["other"])).message == "Invalid audience"


def test_missing_audience_is_refused_as_an_audience_problem() -> None:
    """A token without `aud` must be refused, and the reason must not claim
    that `role` and `exp` are missing: the token has both."""
    error = refused(verifier(audience="authenticated"), hs256())
    assert "audience" in error.message.lower()


def test_audience_not_checked_when_not_configured() -> None:
    assert verifier().verify(hs256(aud="anything")).sub == "user-1"


def test_huge_tokens_are_refused_before_parsing() -> None:
    assert refused(verifier(), "a" * (MAX_TOKEN_BYTES + 1)).message == "Token is too large"
    big = hs256(padding="x" * MAX_TOKEN_BYTES)
    assert len(big) > MAX_TOKEN_BYTES
    assert refused(verifier(), big).message == "Token is too large"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "...",
        "Bearer x.y.z",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "eyJhbGciOiJIUzI1NiJ9.e30.e30.e30",
        "ANON-KEY-123",
        "NEW-USER-JWT-456",
        b64(b"[1]") + ".e30.x",
        b64(b"null") + ".e30.x",
        "\u00e9\u00e9.\u00e9.\u00e9",
    ],
)
def test_garbage_strings_are_refused(token: str) -> None:
    refused(verifier(jwks=cache_with(EC_JWK)), token)


def test_non_utf8_encodable_string_is_refused() -> None:
    # A lone surrogate cannot be encoded as UTF-8; the verifier must refuse
    # the token rather than leak a UnicodeEncodeError.
    refused(verifier(), "\ud800.e30.x")


def test_signed_payload_that_is_not_an_object_is_refused() -> None:
    refused(verifier(), signed(b"[1,2,3]"))


def signed(body: bytes) -> str:
    """An HS256 token over the raw payload bytes ``body``, signed with SECRET."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(body)
    signature = hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


@pytest.mark.parametrize(
    "segment",
    [
        b"",
        b"e30",
        b"e30=",
        b"e30==",
        b"eyJ9",
        b"eyJ9=",
        b"eyJ9===",
        b"e3=0",
        b"e",
        b"e===",
        b"!!!!",
        b"e30!",
        b"e3+/",
        b"e3 0",
        b"e31",  # stray bits in the last character
        b"YQ",
        b"YR",  # stray bits
        b"YQ==",
        b"YWI",
        b"YWJ",  # stray bits
        b"\xff\xfe",
        b"e30\n",
    ],
)
def test_segment_check_matches_pyjwts(segment: bytes) -> None:
    """The hub's regex-based segment check (tokens._HubJWS) accepts and
    decodes exactly what PyJWT's own per-character check does."""
    from hub.auth.tokens import _HubJWS

    def outcome(check: Any) -> object:
        try:
            return check(segment, "payload")
        except jwt.DecodeError as exc:
            return str(exc)

    theirs = outcome(jwt.PyJWS._decode_base64url_segment)
    assert outcome(_HubJWS._decode_base64url_segment) == theirs
    assert type(theirs) in (bytes, str)


def test_payload_json_errors_are_refused_not_raised() -> None:
    # The claims are parsed with orjson: what it refuses (NaN, integers past
    # 64 bits, nesting past its depth limit, invalid UTF-8) is a refused
    # token, never an exception escaping the verifier.
    for body in (b'{"exp": NaN}', b'{"exp": 1' + b"0" * 30 + b"}", b"[" * 2000, b'{"a": "\xff"}'):
        refused(verifier(), signed(body))
    # A well-formed payload still goes through the orjson path.
    now = int(time.time())
    ok = json.dumps({"role": "authenticated", "exp": now + 60, "app_metadata": {"orgs": ["42"]}})
    assert verifier().verify(signed(ok.encode())).orgs == {"42": "member"}


@pytest.mark.parametrize("token", [None, 123, 1.5, True, b"bytes.token.here", ["x"], {"a": 1}])
def test_non_string_tokens_are_refused(token: object) -> None:
    assert refused(verifier(), token).message == "The token provided is not a valid JWT"


def test_error_messages_do_not_quote_the_token() -> None:
    for token in (hs256(OTHER_SECRET), hs256(exp=int(time.time()) - 5), "garbage-token-xyz"):
        error = refused(verifier(), token)
        assert token not in error.reason


def test_verifier_needs_a_key_and_a_long_secret() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(secret=None, jwks=None, orgs_claim=ORGS)
    with pytest.raises(ConfigError):
        TokenVerifier(secret=b"x" * 31, jwks=None, orgs_claim=ORGS)
    TokenVerifier(secret=b"x" * 32, jwks=None, orgs_claim=ORGS)


def test_bad_membership_claim_in_a_valid_token_is_refused() -> None:
    refused(verifier(), hs256(app_metadata={"orgs": "42"}))


def test_membership_in_user_metadata_is_ignored() -> None:
    token = hs256(app_metadata=None, user_metadata={"orgs": ["42"]})
    assert dict(verifier().verify(token).orgs) == {}


# -- JWKS keys held in the cache -----------------------------------------------


def test_es256_and_rs256_from_cached_keys() -> None:
    v = verifier(jwks=cache_with(EC_JWK, RSA_JWK))
    assert v.verify(es256()).sub == "user-1"
    assert v.verify(rs256()).sub == "user-1"
    assert dict(v.verify(es256()).orgs) == {"42": "member"}


def test_unknown_kid_raises_key_not_cached() -> None:
    v = verifier(jwks=cache_with(EC_JWK))
    with pytest.raises(KeyNotCached) as info:
        v.verify(es256(kid="rotated-2"))
    assert info.value.kid == "rotated-2"
    assert not isinstance(info.value, AuthError)


def test_token_without_kid() -> None:
    assert verifier(jwks=cache_with(EC_JWK)).verify(es256(kid=None)).sub == "user-1"
    # With several keys, a token without kid names none of them.
    with pytest.raises(KeyNotCached):
        verifier(jwks=cache_with(EC_JWK, RSA_JWK)).verify(es256(kid=None))


def test_non_string_kid_is_refused() -> None:
    signing_input = ".".join(
        (b64(json.dumps({"alg": "ES256", "kid": 5}).encode()), b64(json.dumps(claims()).encode()))
    )
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), EC_KEY)
    token = f"{signing_input}.{b64(signature)}"
    refused(verifier(jwks=cache_with(EC_JWK)), token)


def test_alg_must_match_the_named_key() -> None:
    # An ES256 token naming the RSA key, and an RS256 token naming the EC key.
    v = verifier(jwks=cache_with(EC_JWK, RSA_JWK))
    assert refused(v, es256(kid="rsa-1")).message == "Failed to validate JWT signature"
    assert refused(v, rs256(kid="ec-1")).message == "Failed to validate JWT signature"


def test_es256_signed_by_another_key_is_refused() -> None:
    v = verifier(jwks=cache_with(EC_JWK))
    assert refused(v, es256(key=EC_KEY_2)).message == "Failed to validate JWT signature"


def test_expired_es256() -> None:
    v = verifier(jwks=cache_with(EC_JWK))
    exp = int(time.time()) - 30
    assert refused(v, es256(exp=exp), now=exp + 30).message == "Token has expired 30 seconds ago"


# -- JWKS over HTTP ------------------------------------------------------------


async def test_load_from_http(jwks_server: JwksServer) -> None:
    cache = JwksCache(jwks_server.url)
    await cache.load()
    assert jwks_server.hits == 1
    assert cache.fetches == 1
    v = verifier(secret=None, jwks=cache)
    assert v.verify(es256()).sub == "user-1"
    assert v.verify(rs256()).sub == "user-1"


async def test_symmetric_keys_in_the_jwks_are_not_used(jwks_server: JwksServer) -> None:
    oct_key = {"kty": "oct", "kid": "oct-1", "k": b64(SECRET), "alg": "HS256"}
    jwks_server.document = {"keys": [EC_JWK, oct_key]}
    cache = JwksCache(jwks_server.url)
    await cache.load()
    assert cache.get("ec-1") is not None
    assert cache.get("oct-1") is None
    token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "oct-1"})
    refused(verifier(secret=None, jwks=cache), token)


@pytest.mark.parametrize(
    "document", [[], {"keys": []}, {"keys": "x"}, {"nope": 1}, {"keys": [{"kty": "EC"}]}]
)
async def test_unusable_jwks_document_is_a_config_error(
    jwks_server: JwksServer, document: Any
) -> None:
    jwks_server.document = document
    with pytest.raises(ConfigError):
        await JwksCache(jwks_server.url).load()


def open_sockets() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def wait_for_sockets(expected: int) -> int:
    """The socket count once it settles at ``expected`` (the server thread
    closes its side a moment after answering), or the last count seen."""
    count = open_sockets()
    for _ in range(50):
        if count == expected:
            break
        await asyncio.sleep(0.02)
        count = open_sockets()
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_http_error_is_a_config_error_and_closes_the_connection(
    jwks_server: JwksServer,
) -> None:
    """An error answer is a ConfigError, and its connection is closed at
    once, not when the garbage collector finds the exception (which then
    raises ResourceWarning)."""
    baseline = open_sockets()
    cache = JwksCache(jwks_server.url)
    await cache.load()
    # A successful fetch leaves no socket behind (both ends closed).
    assert await wait_for_sockets(baseline) == baseline
    jwks_server.status = 500
    with pytest.raises(ConfigError) as info:
        await cache.load()
    assert await wait_for_sockets(baseline) == baseline
    # Release the leaked response now, inside this test, with its warning muted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del info
        gc.collect()


async def test_verify_async_refreshes_once_for_a_new_kid(jwks_server: JwksServer) -> None:
    clock = FakeClock()
    cache = JwksCache(jwks_server.url, min_interval=30, clock=clock)
    await cache.load()
    v = verifier(secret=None, jwks=cache)
    # The auth server rotates in a new key.
    rotated = jwk(EC_KEY_2, "ec-2", "ES256")
    jwks_server.document = {"keys": [EC_JWK, RSA_JWK, rotated]}
    clock.now += 31
    token = es256(kid="ec-2", key=EC_KEY_2)
    assert (await v.verify_async(token)).sub == "user-1"
    assert cache.fetches == 2
    assert jwks_server.hits == 2
    # Known now: no further fetch.
    assert (await v.verify_async(token)).sub == "user-1"
    assert jwks_server.hits == 2


async def test_verify_async_unknown_kid_after_refresh(jwks_server: JwksServer) -> None:
    clock = FakeClock()
    cache = JwksCache(jwks_server.url, min_interval=30, clock=clock)
    await cache.load()
    v = verifier(secret=None, jwks=cache)
    clock.now += 31
    with pytest.raises(AuthError) as info:
        await v.verify_async(es256(kid="forged-1"))
    assert info.value.message == "Unknown signing key"
    assert jwks_server.hits == 2


async def test_refresh_is_rate_bounded(jwks_server: JwksServer) -> None:
    clock = FakeClock()
    cache = JwksCache(jwks_server.url, min_interval=30, clock=clock)
    await cache.load()
    assert cache.fetches == 1
    v = verifier(secret=None, jwks=cache)
    # A flood of forged kids within min_interval causes no fetch at all.
    for i in range(20):
        clock.now += 1
        with pytest.raises(AuthError):
            await v.verify_async(es256(kid=f"forged-{i}"))
    assert cache.fetches == 1
    assert jwks_server.hits == 1
    assert await cache.refresh() is False
    clock.now += 10  # 30 s since the load
    assert await cache.refresh() is True
    assert cache.fetches == 2
    assert await cache.refresh() is False
    assert jwks_server.hits == 2


async def test_first_refresh_fetches(jwks_server: JwksServer) -> None:
    cache = JwksCache(jwks_server.url, clock=FakeClock())
    assert await cache.refresh() is True
    assert cache.get("ec-1") is not None


async def test_failed_refresh_keeps_keys_and_counts_the_attempt(jwks_server: JwksServer) -> None:
    clock = FakeClock()
    cache = JwksCache(jwks_server.url, min_interval=30, clock=clock)
    await cache.load()
    jwks_server.document = ["not", "a", "key", "set"]
    clock.now += 31
    assert await cache.refresh() is False
    assert jwks_server.hits == 2
    assert cache.get("ec-1") is not None
    assert verifier(secret=None, jwks=cache).verify(es256()).sub == "user-1"
    # The failed attempt starts a new interval: no hammering a dead server.
    clock.now += 5
    assert await cache.refresh() is False
    assert jwks_server.hits == 2
    jwks_server.document = {"keys": [EC_JWK]}
    clock.now += 30
    assert await cache.refresh() is True
    assert jwks_server.hits == 3


def test_claims_are_kept_only_when_asked() -> None:
    """Realtime Authorization needs a token's claims; without it a principal
    keeps none (they would cost every connection about 0.9 KB)."""
    token = jwt.encode({"role": "authenticated", "exp": 2_000_000_000, "email": "a@b.c"}, SECRET)
    kept = TokenVerifier(secret=SECRET, jwks=None, orgs_claim=ORGS, keep_claims=True)
    assert kept.verify(token).claims["email"] == "a@b.c"
    dropped = TokenVerifier(secret=SECRET, jwks=None, orgs_claim=ORGS)
    assert dict(dropped.verify(token).claims) == {}
