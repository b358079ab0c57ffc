"""Who may use which topic."""

from __future__ import annotations

import pytest

from hub.auth.policy import authorize_read, authorize_write, may_access
from hub.auth.principal import MEMBER, Principal
from hub.channels.topics import parse_topic
from hub.errors import AuthError

EXP = 2_000_000_000


def principal(
    role: str = "authenticated", sub: str | None = "user-1", orgs: dict[str, str] | None = None
) -> Principal:
    return Principal(role=role, exp=float(EXP), sub=sub, orgs=orgs or {})


MEMBER_42 = principal(orgs={"42": MEMBER, "acme": "admin"})


@pytest.mark.parametrize(
    ("who", "topic", "allowed"),
    [
        (MEMBER_42, "org:42", True),
        (MEMBER_42, "org:42:chat", True),
        (MEMBER_42, "org:acme", True),
        (MEMBER_42, "org:43", False),
        (MEMBER_42, "org:43:chat", False),
        (MEMBER_42, "org:420", False),
        (MEMBER_42, "org:4", False),
        (MEMBER_42, "org:ACME", False),
        (MEMBER_42, "org:Acme:chat", False),
        (MEMBER_42, "user:user-1", True),
        (MEMBER_42, "user:user-2", False),
        (MEMBER_42, "user:USER-1", False),
        (principal(sub=None), "user:user-1", False),
        (principal(sub=None, orgs={"42": MEMBER}), "org:42", True),
        (principal(role="anon", sub=None), "org:42", False),
        (principal(role="service_role", sub=None), "org:42", True),
        (principal(role="service_role", sub=None), "org:anything:else", True),
        (principal(role="service_role", sub=None), "user:someone", True),
        (principal(role="Service_Role"), "org:42", False),
        (principal(role="authenticated", orgs={"42": "service_role"}), "org:43", False),
    ],
)
def test_may_access(who: Principal, topic: str, allowed: bool) -> None:
    parsed = parse_topic(topic)
    assert may_access(who, parsed) is allowed
    if allowed:
        authorize_read(who, parsed)
        authorize_write(who, parsed)
    else:
        with pytest.raises(AuthError) as read:
            authorize_read(who, parsed)
        assert read.value.reason == (
            f"Unauthorized: You do not have permissions to read from this Channel topic: {topic}"
        )
        with pytest.raises(AuthError) as write:
            authorize_write(who, parsed)
        assert write.value.code == "Unauthorized"
        assert "write" in write.value.message


def test_service_role_is_a_property_of_the_role_only() -> None:
    assert principal(role="service_role").is_service
    assert not principal(role="authenticated", orgs={"x": "service_role"}).is_service
