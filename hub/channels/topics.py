"""The topic grammar.

A topic is the part of a channel name after ``realtime:``.  Three shapes
exist; everything else is refused:

* ``org:<id>`` and ``org:<id>:<name>``: an organisation's channels.
* ``user:<sub>``: one user's private channel.
* ``mother``: the network-wide feed of the mother aggregator, for admins.

Names are compared byte for byte: no case folding, no trimming, no
normalisation, no wildcards.  The grammar is deliberately ASCII-only so that
look-alike characters (a Cyrillic letter for a Latin one, full-width colons)
cannot name a topic at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from hub.errors import HubError

#: An org id: starts with a letter or digit, then letters, digits, ``_`` or
#: ``-``; at most 64 characters.
ORG_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: A sub-channel name inside an org: letters, digits, ``_ - .``; at most 64.
CHANNEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A user id (Supabase uses UUIDs): letters, digits, ``_ - . @``; at most 128.
USER_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")

TopicKind = Literal["org", "user", "mother"]
MOTHER: Final = "mother"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic.  ``owner`` is the org id or the user id."""

    kind: TopicKind
    owner: str
    name: str | None
    text: str

    @property
    def org(self) -> str | None:
        return self.owner if self.kind == "org" else None


class InvalidTopic(HubError, ValueError):
    """The topic does not match the grammar."""


def is_org_id(value: object) -> bool:
    return isinstance(value, str) and ORG_ID_RE.fullmatch(value) is not None


def parse_topic(text: str) -> Topic:
    """Parse a topic (without the ``realtime:`` prefix) or raise InvalidTopic."""
    if text == MOTHER:
        return Topic("mother", MOTHER, None, text)
    kind, sep, rest = text.partition(":")
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
    raise InvalidTopic("topics are org:<id>, org:<id>:<name> or user:<id>")
