"""Who may join, and publish to, which topic.

* ``service_role`` may use every topic.
* ``org:<id>`` and ``org:<id>:<name>``: members of ``<id>``.
* ``user:<sub>``: the user whose ``sub`` it is.
* ``mother``: admins only (``service_role`` or the admin claim); read-only.
* a public channel on a free name: any valid token (``anon`` included), as
  in Supabase.  A private one is decided by the app's Realtime
  Authorization policies, not here (``service_role`` bypasses them, as
  Supabase's role does).
"""

from __future__ import annotations

from hub.auth.principal import Principal
from hub.channels.topics import Topic
from hub.errors import AuthError


def may_access(principal: Principal, topic: Topic) -> bool:
    if principal.is_service:
        return True
    if topic.kind == "free":
        return not topic.private
    if topic.kind == "mother":
        return principal.is_admin
    if topic.kind == "org":
        return topic.owner in principal.orgs
    return principal.sub is not None and principal.sub == topic.owner


def authorize_read(principal: Principal, topic: Topic) -> None:
    """Raise AuthError unless ``principal`` may join ``topic``."""
    if not may_access(principal, topic):
        raise AuthError(
            "Unauthorized",
            f"You do not have permissions to read from this Channel topic: {topic.text}",
        )


def authorize_write(principal: Principal, topic: Topic) -> None:
    """Raise AuthError unless ``principal`` may publish to ``topic``."""
    # The mother feed is written by the hub alone.
    if not may_access(principal, topic) or topic.kind == "mother":
        raise AuthError(
            "Unauthorized",
            f"You do not have permissions to write to this Channel topic: {topic.text}",
        )
