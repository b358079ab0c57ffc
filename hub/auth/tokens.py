"""Verifying Supabase JWTs: HS256 with a shared secret, ES256/RS256 via JWKS.

The algorithm a token claims picks the key *kind* before anything is
verified: HS256 only ever meets the shared secret, ES256/RS256 only ever meet
keys from the JWKS.  That closes algorithm confusion (an RS256 public key
used as an HS256 secret) and ``alg: none`` by construction.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import anyio
import jwt
import orjson
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_encode

from hub.auth.principal import DEFAULT_ADMIN_CLAIM, Principal, principal_from_claims
from hub.errors import AuthError, ConfigError, HubError

log = logging.getLogger(__name__)

ASYMMETRIC: Final = ("ES256", "RS256")
#: Supabase tokens are under 2 KB; anything near this is not a real token.
MAX_TOKEN_BYTES: Final = 8192
#: Verified tokens remembered (see TokenVerifier._cache).
CACHE_SIZE: Final = 10_000
#: Below this, HS256 secrets are guessable (RFC 7518 section 3.2).
MIN_SECRET_BYTES: Final = 32


class _PreparedHMAC(HMACAlgorithm):
    """PyJWT's HS256, checking a secret (not PEM- or SSH-shaped, not empty)
    once rather than on every token: those checks were about a fifth of
    the CPU time of a verification, for a key that never changes."""

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one secret per process, never freed anyway
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)


#: What a base64url segment may hold once its padding is stripped.
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


class _HubJWS(jwt.PyJWS):
    """PyJWS with its segment check done by one regex instead of a Python
    generator over every character: that generator was a tenth of the CPU
    time of a connect.  Same rules, same errors; tests/unit/auth/test_tokens.py
    checks both against each other on malformed segments."""

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if (
            padding > 2
            or (padding and len(segment) % 4)
            or len(stripped) % 4 == 1
            or _BASE64URL.fullmatch(stripped) is None
        ):
            raise jwt.DecodeError(f"Invalid {name} padding")
        try:
            decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
        except binascii.Error as err:
            raise jwt.DecodeError(f"Invalid {name} padding") from err
        # Canonical encodings only: no stray bits in the last character.
        if base64url_encode(decoded) != stripped:
            raise jwt.DecodeError(f"Invalid {name} padding")
        return decoded


class _HubJWT(jwt.PyJWT):
    """PyJWT reading claims with orjson (the hook PyJWT documents for
    subclasses), over the JWS above with HS256 swapped for _PreparedHMAC."""

    def __init__(self) -> None:
        super().__init__()
        self._jws = _HubJWS()
        self._jws.unregister_algorithm("HS256")
        self._jws.register_algorithm("HS256", _PreparedHMAC(HMACAlgorithm.SHA256))

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError as err:
            raise jwt.DecodeError(f"Invalid payload string: {err}") from err
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        return payload


#: The hub's own PyJWT instance (the module-level one is shared with
#: whatever else imports jwt).
_JWT = _HubJWT()


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, only to pick the key; PyJWT parses and checks it
    again during verification.  Raises ValueError when it is not one."""
    segment = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, orjson.JSONDecodeError):
        raise ValueError("not a JOSE header") from None
    if not isinstance(header, dict) or "." not in token:
        raise ValueError("not a JOSE header")
    return header


class KeyNotCached(HubError):
    """The token names a JWKS key the cache does not hold (yet).

    Not an AuthError: the caller refreshes the JWKS and tries again, once.
    """

    def __init__(self, kid: str | None) -> None:
        super().__init__(kid)
        self.kid = kid


def _invalid(message: str) -> AuthError:
    return AuthError("InvalidJWTToken", message)


class JwksCache:
    """The signing keys from a JWKS URL.

    Refreshed when a token names an unknown ``kid``, and at most once per
    ``min_interval`` seconds however many such tokens arrive, so a flood of
    forged ``kid`` values cannot turn the hub into a load generator against
    the auth server.
    """

    def __init__(
        self,
        url: str,
        *,
        min_interval: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_interval = min_interval
        self.timeout = timeout
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")
        self._lock = anyio.Lock()
        self.fetches = 0

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            # A token without `kid` against a single-key set: the only key.
            key = next(iter(self._keys.values()))
        return key

    def _fetch(self) -> dict[str, Any]:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data: Any = json.loads(response.read(1 << 20))
        except urllib.error.HTTPError as exc:
            # An HTTPError holds the open response; close it now rather
            # than leave the socket to the garbage collector.
            exc.close()
            raise ValueError(f"HTTP {exc.code}") from None
        if not isinstance(data, dict):
            raise ValueError("JWKS document is not a JSON object")
        return data

    async def load(self) -> None:
        """Fetch the key set now; raise ConfigError if it cannot be used."""
        try:
            document = await anyio.to_thread.run_sync(self._fetch)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except Exception as exc:
            raise ConfigError(f"cannot load JWKS from {self.url}: {exc}") from exc
        self._last_fetch = self._clock()
        self.fetches += 1
        self._keys = {key.key_id: key for key in keys if key.algorithm_name in ASYMMETRIC}
        log.info("loaded %d signing keys from %s", len(self._keys), self.url)

    async def refresh(self) -> bool:
        """Refetch unless one happened within ``min_interval``.  Returns
        whether a fetch happened.  Failures are logged, never raised: the
        keys already held stay in use."""
        async with self._lock:
            if self._clock() - self._last_fetch < self.min_interval:
                return False
            try:
                await self.load()
            except ConfigError as exc:
                # Count the attempt, so a dead auth server is asked at the
                # bounded rate, not once per token.
                self._last_fetch = self._clock()
                log.warning("JWKS refresh failed: %s", exc)
                return False
            return True


class TokenVerifier:
    """Turns a token string into a Principal, or raises AuthError."""

    def __init__(
        self,
        *,
        secret: bytes | None,
        jwks: JwksCache | None,
        orgs_claim: tuple[str, ...],
        admin_claim: tuple[str, ...] = DEFAULT_ADMIN_CLAIM,
        audience: str | None = None,
        leeway: float = 0.0,
        keep_claims: bool = False,
    ) -> None:
        """``keep_claims``: every principal keeps its token's claims, which
        Realtime Authorization hands to the app's policies.  Off without
        policies: the claims would be about 0.9 KB more per connection
        (``python -m loadtest.bench --scenarios capacity``: 5.6 KB against
        4.7 KB per idle joined connection)."""
        if secret is None and jwks is None:
            raise ConfigError("a JWT secret or a JWKS URL is required")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        self.secret = secret
        self.jwks = jwks
        self.orgs_claim = orgs_claim
        self.admin_claim = admin_claim
        self.audience = audience
        self.leeway = leeway
        self.keep_claims = keep_claims
        #: Verified tokens, most recent last: a reconnect storm (a node
        #: drained, a network blip) re-presents the same tokens, and a
        #: byte-identical token needs no second signature check.  Hits are
        #: re-checked for expiry; size bounded by CACHE_SIZE.  Keyed by a
        #: 128-bit BLAKE2b digest of the token rather than the token (a few
        #: hundred bytes each, 3 MB at CACHE_SIZE): finding another token
        #: with the same digest is a second preimage, 2**128 work.
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()

    def verify(self, token: object, now: float | None = None) -> Principal:
        """Verify ``token`` synchronously.

        Raises AuthError when the token is refused, and KeyNotCached when it
        names a JWKS key that may appear after :meth:`JwksCache.refresh`.
        """
        if not isinstance(token, str) or not token:
            raise _invalid("The token provided is not a valid JWT")
        if len(token) > MAX_TOKEN_BYTES:
            raise _invalid("Token is too large")
        if not token.isascii():
            # JWTs are base64url and dots; anything else (lone surrogates
            # included) would only reach the parser to fail there.
            raise _invalid("The token provided is not a valid JWT")
        digest = hashlib.blake2b(token.encode("ascii"), digest_size=16).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if (now if now is not None else time.time()) < cached.exp:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
        try:
            header = _unverified_header(token)
        except ValueError:
            raise _invalid("The token provided is not a valid JWT") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self.secret is not None:
            key = self.secret
        elif alg in ASYMMETRIC and self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise _invalid("The token provided is not a valid JWT")
            jwk = self.jwks.get(kid)
            if jwk is None:
                raise KeyNotCached(kid)
            if jwk.algorithm_name != alg:
                raise _invalid("Failed to validate JWT signature")
            key = jwk.key
        else:
            raise _invalid(f"Signing algorithm {alg!r} is not accepted")
        options: dict[str, Any] = {
            "require": ["exp", "role"],
            "verify_aud": self.audience is not None,
        }
        try:
            claims = _JWT.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                leeway=self.leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise _invalid(self._expired_message(token, now)) from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "aud":
                raise _invalid("Invalid audience: the token has no `aud`") from None
            raise _invalid("Fields `role` and `exp` are required in JWT") from None
        except jwt.InvalidSignatureError:
            raise _invalid("Failed to validate JWT signature") from None
        except jwt.InvalidAudienceError:
            raise _invalid("Invalid audience") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("Token is not yet valid") from None
        except jwt.InvalidTokenError:
            # Don't include the library's message: it may quote the token.
            raise _invalid("The token provided is not a valid JWT") from None
        principal = principal_from_claims(
            claims, self.orgs_claim, self.admin_claim, keep_claims=self.keep_claims
        )
        if now is not None and now >= principal.exp + self.leeway:
            # PyJWT checked against the system clock; the caller's clock
            # (a session's) has the last word.
            raise _invalid(self._expired_message(token, now))
        self._cache[digest] = principal
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    @staticmethod
    def _expired_message(token: str, now: float | None) -> str:
        try:
            exp = jwt.decode(token, options={"verify_signature": False})["exp"]
            if isinstance(exp, bool):
                return "Token has expired"
            ago = int((now if now is not None else time.time()) - float(exp))
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            return "Token has expired"
        return f"Token has expired {max(ago, 0)} seconds ago"

    async def verify_async(self, token: object) -> Principal:
        """Like :meth:`verify`, refreshing the JWKS once for an unknown key."""
        try:
            return self.verify(token)
        except KeyNotCached:
            assert self.jwks is not None
            await self.jwks.refresh()
        try:
            return self.verify(token)
        except KeyNotCached:
            raise _invalid("Unknown signing key") from None


def issue_token(
    secret: str | bytes,
    *,
    sub: str | None,
    orgs: list[str] | dict[str, str] | None = None,
    role: str = "authenticated",
    ttl: float = 3600.0,
    orgs_claim: tuple[str, ...] = ("app_metadata", "orgs"),
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign an HS256 token shaped like Supabase Auth's, for development and
    tests (``hub token``).  Membership goes under ``orgs_claim``."""
    now = int(time.time())
    claims: dict[str, Any] = {"role": role, "iat": now, "exp": now + int(ttl), "iss": "hub"}
    if sub is not None:
        claims["sub"] = sub
    if role == "authenticated":
        claims["aud"] = "authenticated"
    if orgs is not None:
        node = claims
        for part in orgs_claim[:-1]:
            node = node.setdefault(part, {})
        node[orgs_claim[-1]] = orgs
    if extra:
        claims.update(extra)
    return jwt.encode(claims, secret, algorithm="HS256")
