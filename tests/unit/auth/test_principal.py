"""Principals from verified claims: membership, standard claims, claim paths."""

from __future__ import annotations

from typing import Any

import pytest

from hub.auth.policy import may_access
from hub.auth.principal import MEMBER, parse_claim_path, principal_from_claims
from hub.channels.topics import parse_topic
from hub.errors import AuthError, ConfigError

ORGS = ("app_metadata", "orgs")
EXP = 2_000_000_000


def claims(**extra: Any) -> dict[str, Any]:
    return {"role": "authenticated", "exp": EXP, "sub": "user-1", **extra}


def member_of(orgs: Any) -> dict[str, Any]:
    return claims(app_metadata={"orgs": orgs})


# -- membership claims -------------------------------------------------------


def test_list_membership() -> None:
    principal = principal_from_claims(member_of(["42", "acme"]), ORGS)
    assert dict(principal.orgs) == {"42": MEMBER, "acme": MEMBER}
    assert principal.role == "authenticated"
    assert principal.sub == "user-1"
    assert principal.exp == float(EXP)


def test_map_membership_keeps_roles() -> None:
    principal = principal_from_claims(member_of({"42": "admin", "43": "viewer"}), ORGS)
    assert dict(principal.orgs) == {"42": "admin", "43": "viewer"}


def test_no_membership_claim_means_no_orgs() -> None:
    assert dict(principal_from_claims(claims(), ORGS).orgs) == {}
    assert dict(principal_from_claims(claims(app_metadata={}), ORGS).orgs) == {}
    assert dict(principal_from_claims(member_of([]), ORGS).orgs) == {}
    assert dict(principal_from_claims(member_of({}), ORGS).orgs) == {}


def test_nested_claim_path() -> None:
    path = parse_claim_path("app_metadata.hub.orgs")
    principal = principal_from_claims(claims(app_metadata={"hub": {"orgs": ["7"]}}), path)
    assert dict(principal.orgs) == {"7": MEMBER}
    # The default path sees nothing there.
    assert (
        dict(principal_from_claims(claims(app_metadata={"hub": {"orgs": ["7"]}}), ORGS).orgs) == {}
    )


def test_user_metadata_membership_is_ignored() -> None:
    forged = claims(user_metadata={"orgs": ["42"]}, orgs=["42"])
    principal = principal_from_claims(forged, ORGS)
    assert dict(principal.orgs) == {}
    assert not may_access(principal, parse_topic("org:42"))


@pytest.mark.parametrize(
    "orgs",
    [
        "42",
        "42,43",
        42,
        4.2,
        True,
        [42],
        ["42", 43],
        [None],
        [True],
        [["42"]],
        [{"42": "admin"}],
        ["not an id"],
        [""],
        ["org:42"],
        ["\u043e"],
        ["a" * 65],
        {"42": 1},
        {"42": None},
        {"42": True},
        {"42": ["admin"]},
        {"not an id": "admin"},
        {"": "admin"},
    ],
)
def test_wrong_membership_claim_types_are_refused(orgs: Any) -> None:
    with pytest.raises(AuthError) as info:
        principal_from_claims(member_of(orgs), ORGS)
    assert info.value.code == "InvalidJWTToken"
    assert "app_metadata.orgs" in info.value.message


@pytest.mark.parametrize(
    "bad",
    [
        {"role": None},
        {"role": ""},
        {"role": 1},
        {"role": ["authenticated"]},
        {"exp": None},
        {"exp": "2000000000"},
        {"exp": True},
        {"exp": [1]},
        {"sub": 42},
        {"sub": ["user-1"]},
    ],
)
def test_wrong_standard_claims_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        principal_from_claims(claims(**bad), ORGS)


def test_missing_role_or_exp_is_refused() -> None:
    for key in ("role", "exp"):
        value = claims()
        del value[key]
        with pytest.raises(AuthError):
            principal_from_claims(value, ORGS)


def test_empty_sub_means_no_sub() -> None:
    assert principal_from_claims(claims(sub=""), ORGS).sub is None
    value = claims()
    del value["sub"]
    assert principal_from_claims(value, ORGS).sub is None


def test_auth_error_reason_is_code_colon_message() -> None:
    error = AuthError("InvalidJWTToken", "Token has expired 3 seconds ago")
    assert error.reason == "InvalidJWTToken: Token has expired 3 seconds ago"
    assert str(error) == error.reason


# -- claim paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("app_metadata.orgs", ("app_metadata", "orgs")),
        ("app_metadata.hub.orgs", ("app_metadata", "hub", "orgs")),
    ],
)
def test_claim_paths_under_app_metadata(path: str, parts: tuple[str, ...]) -> None:
    assert parse_claim_path(path) == parts


@pytest.mark.parametrize(
    "path",
    [
        "",
        "orgs",
        "app_metadata",
        "user_metadata.orgs",
        "user_metadata.app_metadata.orgs",
        "raw_app_meta_data.orgs",
        "App_metadata.orgs",
        "app_metadata.",
        ".app_metadata.orgs",
        "app_metadata..orgs",
        "role",
        "sub",
    ],
)
def test_claim_paths_outside_app_metadata_are_refused(path: str) -> None:
    with pytest.raises(ConfigError):
        parse_claim_path(path)
