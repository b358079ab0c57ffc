"""``postgres_changes`` bindings: what a join asks for, and what it matches.

A binding is ``{"event", "schema", "table", "filter"?}``; the join reply must
echo every binding in order, unchanged, plus an integer ``id`` (never 0),
or both Supabase clients abandon the channel.  Filters use Supabase's
``column=op.value`` syntax with ``eq neq lt lte gt gte in``.  No I/O.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Final

from hub.errors import HubError
from hub.store.base import Table

EVENTS: Final = ("*", "INSERT", "UPDATE", "DELETE")
OPERATORS: Final = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
#: Bindings per join; Supabase has no documented cap, the hub keeps one.
MAX_BINDINGS: Final = 100


class InvalidBinding(HubError, ValueError):
    """A ``postgres_changes`` binding the hub cannot honour."""


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str
    #: One value for the comparison operators, several for ``in``.
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Binding:
    event: str
    schema: str
    table: str
    filter: Filter | None
    id: int
    #: The binding exactly as the client sent it, for the join reply.
    raw: dict[str, Any]

    def reply(self) -> dict[str, Any]:
        return {**self.raw, "id": self.id}


def parse_filter(text: str) -> Filter:
    column, sep, rest = text.partition("=")
    op, dot, value = rest.partition(".")
    if not sep or not dot or _IDENT.fullmatch(column) is None or op not in OPERATORS:
        raise InvalidBinding(f"invalid filter {text!r}: expected column=op.value")
    if op == "in":
        if not (value.startswith("(") and value.endswith(")")):
            raise InvalidBinding(f"invalid filter {text!r}: in takes (a,b,...)")
        values = tuple(v.strip().strip('"') for v in value[1:-1].split(","))
        return Filter(column, op, values)
    return Filter(column, op, (value,))


def binding_id(event: str, schema: str, table: str, filter_text: str | None) -> int:
    """A stable, non-zero id for a binding: equal bindings get equal ids on
    every node, so a change can be matched to ids without coordination."""
    value = zlib.crc32(f"{event}\x00{schema}\x00{table}\x00{filter_text or ''}".encode())
    return value or 1


def parse_bindings(raw: Any) -> list[Binding]:
    """Validate a join's ``postgres_changes`` list or raise InvalidBinding."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidBinding("postgres_changes must be a list")
    if len(raw) > MAX_BINDINGS:
        raise InvalidBinding(f"at most {MAX_BINDINGS} postgres_changes bindings per channel")
    bindings = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidBinding("each postgres_changes binding must be an object")
        event = item.get("event", "*")
        schema = item.get("schema", "public")
        table = item.get("table", "*")
        filter_text = item.get("filter")
        if event not in EVENTS:
            raise InvalidBinding(f"event must be one of {', '.join(EVENTS)}")
        if not isinstance(schema, str) or (schema != "*" and _IDENT.fullmatch(schema) is None):
            raise InvalidBinding("schema must be an identifier or *")
        if not isinstance(table, str) or (table != "*" and _IDENT.fullmatch(table) is None):
            raise InvalidBinding("table must be an identifier or *")
        if filter_text is not None and not isinstance(filter_text, str):
            raise InvalidBinding("filter must be a string")
        parsed = parse_filter(filter_text) if filter_text else None
        bindings.append(
            Binding(
                event,
                schema,
                table,
                parsed,
                binding_id(event, schema, table, filter_text),
                dict(item),
            )
        )
    return bindings


def _compare(actual: Any, op: str, wanted: str) -> bool:
    """Compare a record value with a filter value the way PostgREST reads
    them: numbers numerically, booleans as true/false, the rest as text."""
    if actual is None:
        return False
    left: Any
    right: Any
    if isinstance(actual, bool):
        left, right = str(actual).lower(), wanted.lower()
    elif isinstance(actual, int | float):
        try:
            left, right = actual, float(wanted)
        except ValueError:
            return False
    else:
        left, right = actual if isinstance(actual, str) else str(actual), wanted
    if op == "eq":
        return bool(left == right)
    if op == "neq":
        return bool(left != right)
    if op == "lt":
        return bool(left < right)
    if op == "lte":
        return bool(left <= right)
    if op == "gt":
        return bool(left > right)
    return bool(left >= right)  # gte


def matches(binding: Binding, change: dict[str, Any]) -> bool:
    """Whether a captured change (the payload of a ``change`` event) matches
    ``binding``.  Tenancy is not decided here: the caller only offers a
    subscription the changes of its own org."""
    if binding.event != "*" and binding.event != change.get("type"):
        return False
    if binding.schema != "*" and binding.schema != change.get("schema"):
        return False
    if binding.table != "*" and binding.table != change.get("table"):
        return False
    flt = binding.filter
    if flt is None:
        return True
    row = change.get("record") or change.get("old_record") or {}
    if change.get("type") == "DELETE":
        row = change.get("old_record") or {}
    if not isinstance(row, dict) or flt.column not in row:
        return False
    actual = row[flt.column]
    if flt.op == "in":
        return any(_compare(actual, "eq", value) for value in flt.values)
    return _compare(actual, flt.op, flt.values[0])


def unmatched(bindings: list[Binding], tables: frozenset[Table]) -> list[Binding]:
    """The bindings that name no table of ``tables`` (the tracked ones);
    ``*`` matches any schema or any table."""
    return [
        b
        for b in bindings
        if not any(
            b.schema in ("*", schema) and b.table in ("*", table) for schema, table in tables
        )
    ]


def unable_to_subscribe(binding: Binding) -> str:
    """Supabase's ``system`` error for a binding that matches no table."""
    params = f"event: {binding.event}, schema: {binding.schema}, table: {binding.table}"
    if binding.filter is not None:
        params += f", filter: {binding.raw.get('filter')}"
    return (
        "Unable to subscribe to changes with given parameters. Please check Realtime is "
        f"enabled for the given connect parameters: [{params}]"
    )
