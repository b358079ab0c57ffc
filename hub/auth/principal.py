"""Who a verified token speaks for.

Org membership is read from a claim under ``app_metadata`` (server-controlled
in Supabase), never from ``user_metadata``, which users edit themselves.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from hub.channels.topics import is_org_id
from hub.errors import AuthError, ConfigError

SERVICE_ROLE: Final = "service_role"
#: The role a member gets when ``orgs`` is a plain list.
MEMBER: Final = "member"
#: The claims of a principal that keeps none (one shared, read-only map).
NO_CLAIMS: Final[Mapping[str, Any]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind a connection or a channel."""

    role: str
    exp: float
    sub: str | None = None
    #: org id -> the member's role in that org.
    orgs: Mapping[str, str] = field(default_factory=dict)
    #: True when the admin claim (``HUB_ADMIN_CLAIM``) is exactly ``true``.
    admin: bool = False
    #: Every claim of the token, as verified, when the verifier keeps them
    #: (Realtime Authorization hands them to the app's policies as
    #: ``request.jwt.claims``); else empty.  Never copied.
    claims: Mapping[str, Any] = field(default_factory=lambda: NO_CLAIMS, compare=False, repr=False)

    @property
    def is_service(self) -> bool:
        return self.role == SERVICE_ROLE

    @property
    def is_admin(self) -> bool:
        """May watch the whole network (the ``mother`` topic, dashboard)."""
        return self.is_service or self.admin


def parse_claim_path(path: str) -> tuple[str, ...]:
    """Validate a dotted claim path such as ``app_metadata.orgs``.

    Raises ConfigError unless the path lies under ``app_metadata``: every
    other place in a Supabase token is either user-editable or not ours.
    """
    parts = tuple(path.split("."))
    if len(parts) < 2 or parts[0] != "app_metadata" or not all(parts):
        raise ConfigError(
            f"claim path {path!r} must name a key under app_metadata, e.g. app_metadata.orgs"
        )
    return parts


def _lookup(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


DEFAULT_ADMIN_CLAIM: Final = ("app_metadata", "hub_admin")


def principal_from_claims(
    claims: Mapping[str, Any],
    orgs_path: tuple[str, ...],
    admin_path: tuple[str, ...] = DEFAULT_ADMIN_CLAIM,
    *,
    keep_claims: bool = True,
) -> Principal:
    """Build a Principal from verified claims or raise AuthError.

    Claims of the wrong type are refused rather than ignored: a token that
    says something odd about membership is a bug or an attack.
    """
    role, exp, sub = claims.get("role"), claims.get("exp"), claims.get("sub")
    if not isinstance(role, str) or not role:
        raise AuthError("InvalidJWTToken", "Claim `role` must be a non-empty string")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("InvalidJWTToken", "Claim `exp` must be a number")
    if sub is not None and not isinstance(sub, str):
        raise AuthError("InvalidJWTToken", "Claim `sub` must be a string")
    raw = _lookup(claims, orgs_path)
    label = ".".join(orgs_path)
    orgs: dict[str, str] = {}
    if raw is None:
        pass
    elif isinstance(raw, list):
        for org in raw:
            if not is_org_id(org):
                raise AuthError("InvalidJWTToken", f"Claim `{label}` holds an invalid org id")
            orgs[sys.intern(org)] = MEMBER
    elif isinstance(raw, dict):
        for org, org_role in raw.items():
            if not is_org_id(org) or not isinstance(org_role, str):
                raise AuthError(
                    "InvalidJWTToken", f"Claim `{label}` must map org ids to role strings"
                )
            orgs[sys.intern(org)] = sys.intern(org_role)
    else:
        raise AuthError("InvalidJWTToken", f"Claim `{label}` must be a list or a map of org ids")
    admin = _lookup(claims, admin_path) is True
    # Each connection holds its principal: org ids and roles are interned,
    # and principals with the same memberships share one read-only map.
    return Principal(
        role=sys.intern(role),
        exp=float(exp),
        sub=sub or None,
        orgs=_shared_orgs(tuple(orgs.items())),
        admin=admin,
        claims=claims if keep_claims else NO_CLAIMS,
    )


#: Distinct memberships remembered (see _shared_orgs).
SHARED_ORGS: Final = 4096


@functools.lru_cache(maxsize=SHARED_ORGS)
def _shared_orgs(items: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """One read-only map for every principal with these memberships (a
    dict is about 230 bytes even with one org in it)."""
    return MappingProxyType(dict(items))
