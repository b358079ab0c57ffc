"""The topic grammar.

A topic is the part of a channel name after ``realtime:``.  The hub reserves
three namespaces, with a strict grammar each:

* ``org:<id>`` and ``org:<id>:<name>``: an organisation's channels.
* ``user:<sub>``: one user's private channel.
* ``mother``: the network-wide feed of the mother aggregator, for admins.

A topic whose first ``:``-separated segment is ``org``, ``user`` or
``mother`` is in a reserved namespace and must match its grammar, or it is
refused.  Reserved names are compared byte for byte: no case folding, no
trimming, no normalisation, no wildcards, ASCII only, so that look-alike
characters (a Cyrillic letter for a Latin one, full-width colons) cannot
name one at all.

Every other topic is a **free name**: an ordinary Supabase channel
(``room:lobby``, ``schema-db-changes``).  A free name is 1 to
:data:`MAX_FREE_TOPIC_BYTES` bytes of UTF-8 without control characters,
taken byte for byte.  A free name is public or private (the join's
``config.private``), and a public and a private channel of the same name
are different channels: :attr:`Topic.key`, what the fan-out and the engine
route by, tells them apart.  In reserved namespaces ``private`` does not
split the channel: the hub's own rules decide who may use it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final, Literal

from hub.errors import HubError
from hub.protocol import MAX_BINARY_FIELD, PRIVATE_MARK, TOPIC_PREFIX

#: An org id: starts with a letter or digit, then letters, digits, ``_`` or
#: ``-``; at most 64 characters.
ORG_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: A sub-channel name inside an org: letters, digits, ``_ - .``; at most 64.
CHANNEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A user id (Supabase uses UUIDs): letters, digits, ``_ - . @``; at most 128.
USER_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")

TopicKind = Literal["org", "user", "mother", "free"]
MOTHER: Final = "mother"
#: First segments of the reserved namespaces.
RESERVED: Final = frozenset({"org", "user", MOTHER})
#: The longest free name: its wire topic (``realtime:`` + name) must fit a
#: binary frame's one-byte length.
MAX_FREE_TOPIC_BYTES: Final = MAX_BINARY_FIELD - len(TOPIC_PREFIX)
#: C0 and C1 control characters and DEL, never part of a free name (they
#: would corrupt logs, and the private mark is one of them).
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic.  ``owner`` is the org id or the user id."""

    kind: TopicKind
    owner: str
    name: str | None
    text: str
    #: A private free name (``config.private``); always False in reserved
    #: namespaces.
    private: bool = False

    @property
    def org(self) -> str | None:
        return self.owner if self.kind == "org" else None

    @property
    def key(self) -> str:
        """What the fan-out, presence and the engine route by: the text,
        marked for a private free name so that it never meets the public
        channel of the same name."""
        return PRIVATE_MARK + self.text if self.private else self.text


class InvalidTopic(HubError, ValueError):
    """The topic does not match the grammar."""


def is_org_id(value: object) -> bool:
    return isinstance(value, str) and ORG_ID_RE.fullmatch(value) is not None


class TopicNameRequired(InvalidTopic):
    """The topic is empty."""


#: Parsed topics remembered: every subscriber of a topic shares one
#: :class:`Topic` (and its text) instead of keeping its own.
TOPIC_CACHE_SIZE: Final = 4096


def parse_topic(text: str, *, private: bool = False) -> Topic:
    """Parse a topic (without the ``realtime:`` prefix) or raise InvalidTopic.

    ``private`` makes a free name a private channel; reserved namespaces
    ignore it.  Topics are immutable; the same text gives the same object
    while it is among the last :data:`TOPIC_CACHE_SIZE` parsed."""
    return _parse_topic(text, private)


@functools.lru_cache(maxsize=TOPIC_CACHE_SIZE)
def _parse_topic(text: str, private: bool) -> Topic:
    if text == MOTHER:
        return Topic("mother", MOTHER, None, text)
    kind, sep, rest = text.partition(":")
    if kind not in RESERVED:
        return _free(text, private)
    if not sep:
        raise InvalidTopic("topics are org:<id>, org:<id>:<name> or user:<id>")
    if kind == "org":
        org, sep, name = rest.partition(":")
        if ORG_ID_RE.fullmatch(org) is None:
            raise InvalidTopic("invalid org id")
        if sep:
            if CHANNEL_NAME_RE.fullmatch(name) is None:
                raise InvalidTopic("invalid channel name")
            return Topic("org", org, name, text)
        return Topic("org", org, None, text)
    if kind == "user":
        if USER_ID_RE.fullmatch(rest) is None:
            raise InvalidTopic("invalid user id")
        return Topic("user", rest, None, text)
    raise InvalidTopic("mother takes no sub-topics")


def _free(text: str, private: bool) -> Topic:
    if not text:
        raise TopicNameRequired("You must provide a topic name")
    if len(text.encode()) > MAX_FREE_TOPIC_BYTES:
        raise InvalidTopic(f"topic names are at most {MAX_FREE_TOPIC_BYTES} bytes")
    if _CONTROL.search(text) is not None:
        raise InvalidTopic("topic names contain no control characters")
    return Topic("free", "", None, text, private)
