"""Row changes of tables tracked without an org column: the NOTIFYs of
``hub_changes`` turned into change dicts, in order.

``hub.capture_public()`` (see ``migrations/0006_orgless_changes.sql``) sends
one NOTIFY per row change of a table tracked with ``hub track --no-org`` or
added to the publication ``supabase_realtime``, with the whole change::

    {"id", "schema", "table", "type", "record", "old_record", "columns",
     "commit_timestamp", "relid", "rls", "pk"}

or, when it would not fit, only ``{"id", "ref": true}``: the change is then
read from ``hub.change_overflow``.  These rows never enter an org's event
log; they are for the ``postgres_changes`` bindings of free-name channels.

:func:`change_relay` makes the :class:`~hub.store.relay.NotifyRelay` that
gets the payloads from the store's LISTEN connection, as database
broadcasts are relayed: in commit order, bounded, references read back.

Best effort, as in Supabase: a change notified while the LISTEN connection
is being re-established is lost, and so is one whose overflow row cannot be
read.  Nothing is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from hub.store.pgjson import loads
from hub.store.relay import NotifyRelay, Reference, RelayNames

log = logging.getLogger(__name__)

#: The NOTIFY channel ``hub.capture_public()`` announces on.
CHANGES_CHANNEL: Final = "hub_changes"

#: Row operations a change may carry.
OPERATIONS: Final = ("INSERT", "UPDATE", "DELETE")

#: Reads a change too large for its NOTIFY by id; None when it is gone.
FetchChange = Callable[[int], Awaitable[dict[str, Any] | None]]


def check_change(data: Any) -> dict[str, Any]:
    """``data`` when it is a well-formed change; raises TypeError otherwise."""
    if not isinstance(data, dict):
        raise TypeError("a change is a JSON object")
    if not isinstance(data.get("schema"), str) or not isinstance(data.get("table"), str):
        raise TypeError("schema and table must be strings")
    if data.get("type") not in OPERATIONS:
        raise TypeError("type must be INSERT, UPDATE or DELETE")
    for key in ("record", "old_record"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise TypeError(f"{key} must be an object or null")
    if not isinstance(data.get("relid"), int) or not isinstance(data.get("pk"), list):
        raise TypeError("relid must be an integer and pk a list")
    return data


def parse_change(text: str) -> dict[str, Any] | int:
    """The change a NOTIFY carries, or the id of one to read.  Raises
    ValueError, KeyError or TypeError for anything else."""
    data = loads(text)
    if isinstance(data, dict) and data.get("ref"):
        change_id = data["id"]
        if not isinstance(change_id, int) or isinstance(change_id, bool):
            raise TypeError("id must be an integer")
        return change_id
    return check_change(data)


def _parse(text: str) -> dict[str, Any] | Reference[int]:
    parsed = parse_change(text)
    return Reference(parsed) if isinstance(parsed, int) else parsed


def change_relay(
    fetch: FetchChange, deliver: Callable[[dict[str, Any]], None]
) -> NotifyRelay[dict[str, Any], int]:
    """The relay of :data:`CHANGES_CHANNEL`: references are read from
    ``hub.change_overflow`` with ``fetch(id)``."""
    return NotifyRelay(
        _parse,
        fetch,
        deliver,
        names=RelayNames("row change", "hub.change_overflow", "hub-row-changes"),
        label=lambda change: change.get("table"),
    )
