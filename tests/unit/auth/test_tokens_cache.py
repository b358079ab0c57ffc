"""The verified-token cache: hits skip the signature check, never expiry."""

from __future__ import annotations

import time

import jwt
import pytest

from hub.auth import tokens
from hub.auth.tokens import CACHE_SIZE, TokenVerifier, issue_token
from hub.errors import AuthError

SECRET = "c" * 40


def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET.encode(), jwks=None, orgs_claim=("app_metadata", "orgs"))


def test_a_repeated_token_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    v = verifier()
    token = issue_token(SECRET, sub="u", orgs=["a"])
    calls = []
    real = tokens._JWT.decode
    monkeypatch.setattr(tokens._JWT, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = v.verify(token)
    assert v.verify(token) is first
    assert len(calls) == 1


def test_a_cached_token_still_expires() -> None:
    v = verifier()
    token = issue_token(SECRET, sub="u", orgs=["a"], ttl=60)
    principal = v.verify(token)
    with pytest.raises(AuthError, match="expired"):
        v.verify(token, now=principal.exp + 1)


def test_a_tampered_token_misses_the_cache() -> None:
    v = verifier()
    token = issue_token(SECRET, sub="u", orgs=["a"])
    v.verify(token)
    with pytest.raises(AuthError):
        v.verify(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))


def test_the_cache_is_bounded() -> None:
    v = verifier()
    now = int(time.time())
    for i in range(CACHE_SIZE + 5):
        v.verify(jwt.encode({"role": "anon", "exp": now + 60, "n": i}, SECRET, algorithm="HS256"))
    assert len(v._cache) == CACHE_SIZE


def test_the_cache_keeps_a_digest_not_the_token() -> None:
    # A cached token costs 16 bytes of key, not its few hundred bytes of
    # text (10,000 of them were 3 MB): nothing keeps the text alive.
    v = verifier()
    token = issue_token(SECRET, sub="u", orgs=["a"])
    principal = v.verify(token)
    assert [len(k) for k in v._cache] == [16]
    assert v.verify("".join(token)) is principal  # an equal string, another object


def test_principals_share_memberships_org_ids_and_roles() -> None:
    # Each connection holds its principal: one map, and one string per org
    # id and role, for every member with the same memberships.
    v = verifier()
    one = v.verify(issue_token(SECRET, sub="u1", orgs={"acme": "admin"}))
    two = v.verify(issue_token(SECRET, sub="u2", orgs={"acme": "admin"}))
    assert one.orgs is two.orgs and one.role is two.role
    with pytest.raises(TypeError):  # shared, so read-only
        one.orgs["other"] = "admin"  # type: ignore[index]
    three = v.verify(issue_token(SECRET, sub="u3", orgs=["acme", "beta"]))
    assert dict(three.orgs) == {"acme": "member", "beta": "member"}
    assert next(iter(three.orgs)) is next(iter(one.orgs))
