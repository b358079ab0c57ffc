"""The topic grammar: what names a channel, and what cannot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.channels.topics import (
    MAX_FREE_TOPIC_BYTES,
    InvalidTopic,
    Topic,
    TopicNameRequired,
    is_org_id,
    parse_topic,
)


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("org:42", Topic("org", "42", None, "org:42")),
        ("org:acme", Topic("org", "acme", None, "org:acme")),
        ("org:Acme", Topic("org", "Acme", None, "org:Acme")),
        ("org:a-b_c", Topic("org", "a-b_c", None, "org:a-b_c")),
        ("org:42:chat", Topic("org", "42", "chat", "org:42:chat")),
        ("org:42:room-1.v2_x", Topic("org", "42", "room-1.v2_x", "org:42:room-1.v2_x")),
        ("org:42:.hidden", Topic("org", "42", ".hidden", "org:42:.hidden")),
        ("org:" + "a" * 64, Topic("org", "a" * 64, None, "org:" + "a" * 64)),
        ("org:1:" + "n" * 64, Topic("org", "1", "n" * 64, "org:1:" + "n" * 64)),
        (
            "user:6f1b2c3d-0000-4000-8000-123456789abc",
            Topic(
                "user",
                "6f1b2c3d-0000-4000-8000-123456789abc",
                None,
                "user:6f1b2c3d-0000-4000-8000-123456789abc",
            ),
        ),
        (
            "user:alice@example.com",
            Topic("user", "alice@example.com", None, "user:alice@example.com"),
        ),
        ("user:" + "u" * 128, Topic("user", "u" * 128, None, "user:" + "u" * 128)),
    ],
)
def test_valid_topics(text: str, topic: Topic) -> None:
    assert parse_topic(text) == topic


def test_org_property() -> None:
    assert parse_topic("org:42:chat").org == "42"
    assert parse_topic("user:42").org is None


def test_case_is_significant() -> None:
    lower, upper = parse_topic("org:acme"), parse_topic("org:ACME")
    assert lower.owner == "acme"
    assert upper.owner == "ACME"
    assert lower != upper
    assert lower.text != upper.text


@pytest.mark.parametrize(
    "text",
    [
        ":42",
        "ORG:42",
        "Org:42",
        "USER:alice",
        "team:42",
        "realtime:org:42",
        " org:42",
        "\u043erg:42",  # Cyrillic o in the word org
        "org\uff1a42",  # full-width colon
    ],
)
def test_look_alikes_of_reserved_names_are_free_names_never_org_topics(text: str) -> None:
    """Outside the reserved namespaces a name is an ordinary Supabase
    channel: it parses, but as itself, never as the org or user topic it
    resembles, so it cannot reach that topic's messages."""
    topic = parse_topic(text)
    assert topic.kind == "free" and topic.org is None and topic.text == text
    assert topic.key not in {"org:42", "user:alice"}


@pytest.mark.parametrize(
    "text",
    [
        "org",
        "org:",
        "org:42:",
        "org::chat",
        "org:a:b:c",
        "org:42:chat:extra",
        "org:-42",
        "org:_42",
        "org:4 2",
        "org:42 ",
        "org: 42",
        "org:42\n",
        "org:42\t",
        "org:42\x00",
        "org:*",
        "org:42:*",
        "org:%",
        "org:42:#",
        "org:4?",
        "org:" + "a" * 65,
        "org:42:" + "n" * 65,
        "org:\u043e\u0440\u0433",  # Cyrillic letters
        "org:ac\u043ee",  # Cyrillic o inside the id
        "org:42\uff1achat",
        "org:\uff14\uff12",  # full-width digits
        "org:caf\u00e9",
        "org:e\u0301",  # combining accent
        "org:42\u200b",  # zero-width space
        "org:\u0664\u0662",  # Arabic-Indic digits
        "user:",
        "user:.alice",
        "user:@alice",
        "user:alice:bob",
        "user:al ice",
        "user:" + "u" * 129,
        "user:\u0430lice",  # Cyrillic a
    ],
)
def test_invalid_topics(text: str) -> None:
    with pytest.raises(InvalidTopic):
        parse_topic(text)


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_topic("org:")


@pytest.mark.parametrize(
    "text",
    [
        "room1",
        "room:lobby:messages",
        "schema-db-changes",
        "channel-6f1b2c3d",
        "caf\u00e9 \u2615",
        "a",
    ],
)
def test_free_names_are_supabase_channels(text: str) -> None:
    public, private = parse_topic(text), parse_topic(text, private=True)
    assert public == Topic("free", "", None, text) and not public.private
    assert private.private and private.text == text
    # Two channels: they route by different keys.
    assert public.key == text and private.key != public.key


def test_private_does_not_split_reserved_namespaces() -> None:
    assert parse_topic("org:42", private=True) == parse_topic("org:42")
    assert parse_topic("org:42", private=True).key == "org:42"
    assert parse_topic("mother", private=True).key == "mother"


def test_an_empty_topic_needs_a_name() -> None:
    with pytest.raises(TopicNameRequired, match="You must provide a topic name"):
        parse_topic("")


def test_free_names_have_a_length_limit_and_no_control_characters() -> None:
    longest = "r" * MAX_FREE_TOPIC_BYTES
    assert parse_topic(longest).text == longest
    assert MAX_FREE_TOPIC_BYTES + len("realtime:") == 255  # one length byte, kind 4
    for bad in (
        longest + "r",
        "\u00e9" * (MAX_FREE_TOPIC_BYTES // 2 + 1),
        "room\n",
        "ro\x00om",
        "\x7f",
    ):
        with pytest.raises(InvalidTopic):
            parse_topic(bad)


@pytest.mark.parametrize("text", ["mother:x", "org", "user", "org:42:a:b"])
def test_reserved_namespaces_keep_their_strict_grammar(text: str) -> None:
    with pytest.raises(InvalidTopic):
        parse_topic(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("42", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("-1", False),
        ("4:2", False),
        ("\u043e", False),
        (42, False),
        (None, False),
        (["42"], False),
    ],
)
def test_is_org_id(value: object, expected: bool) -> None:
    assert is_org_id(value) is expected


@settings(max_examples=200, database=None, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_parse_topic_is_ascii_and_exact(text: str) -> None:
    try:
        topic = parse_topic(text)
    except InvalidTopic:
        return
    # Whatever parses is kept byte for byte; whatever parses into a reserved
    # namespace is ASCII without whitespace or wildcards; a free name never
    # reaches an org, a user or the mother.
    assert topic.text == text
    if topic.kind == "free":
        assert topic.org is None and text.partition(":")[0] not in ("org", "user", "mother")
        return
    assert text.isascii()
    assert not any(c.isspace() for c in text)
    assert topic.kind in ("org", "user", "mother")
    assert "*" not in text


def test_subscribers_of_a_topic_share_one_parsed_topic() -> None:
    # Each subscription holds its Topic: one object (and one text) for all.
    assert parse_topic("org:acme:chat") is parse_topic("".join("org:acme:chat"))
    assert parse_topic("room") is not parse_topic("room", private=True)
    assert parse_topic("room", private=True).private
