"""postgres_changes bindings: parsing, the join-reply echo, filters, matching."""

from __future__ import annotations

from typing import Any

import pytest

from hub.channels.changes import (
    MAX_BINDINGS,
    Filter,
    InvalidBinding,
    binding_id,
    matches,
    parse_bindings,
    parse_filter,
    unmatched,
)


def test_none_and_empty_mean_no_bindings() -> None:
    assert parse_bindings(None) == []
    assert parse_bindings([]) == []


def test_reply_echoes_each_binding_in_order_plus_an_id() -> None:
    raw = [
        {"event": "*", "schema": "public", "table": "events"},
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "org_id=eq.42"},
        {"event": "DELETE", "schema": "audit", "table": "*"},
        {"event": "UPDATE", "schema": "public", "table": "events"},
    ]
    bindings = parse_bindings(raw)
    replies = [binding.reply() for binding in bindings]
    for sent, reply in zip(raw, replies, strict=True):
        assert {k: v for k, v in reply.items() if k != "id"} == sent
        assert list(reply)[: len(sent)] == list(sent)  # key order kept
        assert type(reply["id"]) is int
        assert reply["id"] != 0
    # No "filter": "" appears when none was sent.
    assert "filter" not in replies[0]
    assert len({reply["id"] for reply in replies}) == len(replies)


def test_echo_is_verbatim_even_for_unknown_keys() -> None:
    raw = [{"event": "*", "schema": "public", "table": "t", "extra": [1, {"a": None}]}]
    (binding,) = parse_bindings(raw)
    assert binding.reply() == {**raw[0], "id": binding.id}
    # The reply is a copy: editing it does not change the binding.
    binding.reply()["event"] = "DELETE"
    assert binding.reply()["event"] == "*"


def test_ids_are_stable_and_depend_on_every_field() -> None:
    first = parse_bindings([{"event": "*", "schema": "public", "table": "t"}])[0].id
    again = parse_bindings([{"event": "*", "schema": "public", "table": "t"}])[0].id
    assert first == again == binding_id("*", "public", "t", None)
    variants = [
        binding_id("INSERT", "public", "t", None),
        binding_id("*", "other", "t", None),
        binding_id("*", "public", "u", None),
        binding_id("*", "public", "t", "id=eq.1"),
    ]
    assert first not in variants
    assert len(set(variants)) == len(variants)
    assert all(isinstance(v, int) and v != 0 for v in variants)


def test_defaults() -> None:
    (binding,) = parse_bindings([{}])
    assert (binding.event, binding.schema, binding.table, binding.filter) == (
        "*",
        "public",
        "*",
        None,
    )
    assert binding.reply() == {"id": binding.id}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id=eq.5", Filter("id", "eq", ("5",))),
        ("status=neq.done", Filter("status", "neq", ("done",))),
        ("n=lt.10", Filter("n", "lt", ("10",))),
        ("n=lte.10", Filter("n", "lte", ("10",))),
        ("n=gt.-1.5", Filter("n", "gt", ("-1.5",))),
        ("n=gte.0", Filter("n", "gte", ("0",))),
        ("name=eq.a.b.c", Filter("name", "eq", ("a.b.c",))),
        ("name=eq.x=y", Filter("name", "eq", ("x=y",))),
        ("id=in.(1,2,3)", Filter("id", "in", ("1", "2", "3"))),
        ("id=in.(1, 2)", Filter("id", "in", ("1", "2"))),
        ('tag=in.("a b",c)', Filter("tag", "in", ("a b", "c"))),
        ("id=in.(7)", Filter("id", "in", ("7",))),
        ("_col$1=eq.x", Filter("_col$1", "eq", ("x",))),
    ],
)
def test_filters(text: str, expected: Filter) -> None:
    assert parse_filter(text) == expected
    (binding,) = parse_bindings([{"event": "*", "schema": "public", "table": "t", "filter": text}])
    assert binding.filter == expected
    assert binding.reply()["filter"] == text


@pytest.mark.parametrize(
    "text",
    [
        "id",
        "id=5",
        "id=eq",
        "id=eq5",
        "=eq.5",
        "id=like.5",
        "id=ilike.%a%",
        "id=is.null",
        "id=EQ.5",
        "1id=eq.5",
        "my col=eq.5",
        "id=in.1,2",
        "id=in.(1,2",
        "id=in.1,2)",
        "a" * 64 + "=eq.1",
    ],
)
def test_invalid_filters(text: str) -> None:
    with pytest.raises(InvalidBinding):
        parse_filter(text)
    with pytest.raises(InvalidBinding):
        parse_bindings([{"event": "*", "schema": "public", "table": "t", "filter": text}])


@pytest.mark.parametrize(
    "raw",
    [
        "*",
        {"event": "*"},
        [1],
        ["*"],
        [None],
        [{"event": "insert"}],
        [{"event": "TRUNCATE"}],
        [{"event": ["*"]}],
        [{"event": None}],
        [{"schema": ""}],
        [{"schema": "pub lic"}],
        [{"schema": "public;drop"}],
        [{"schema": 1}],
        [{"schema": "a*"}],
        [{"table": ""}],
        [{"table": "a-b"}],
        [{"table": "t*"}],
        [{"table": 5}],
        [{"filter": 5}],
        [{"filter": ["id=eq.1"]}],
        [{"event": "*"}] * (MAX_BINDINGS + 1),
    ],
)
def test_invalid_bindings(raw: Any) -> None:
    with pytest.raises(InvalidBinding):
        parse_bindings(raw)


def test_max_bindings_is_allowed() -> None:
    assert len(parse_bindings([{"event": "*"}] * MAX_BINDINGS)) == MAX_BINDINGS


def test_empty_filter_means_none_and_is_echoed() -> None:
    (binding,) = parse_bindings([{"event": "*", "schema": "public", "table": "t", "filter": ""}])
    assert binding.filter is None
    assert binding.reply()["filter"] == ""


# -- matching --------------------------------------------------------------------


def change(kind: str = "INSERT", table: str = "events", **record: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"schema": "public", "table": table, "type": kind}
    if kind == "DELETE":
        value["old_record"] = record
    else:
        value["record"] = record
    return value


def bind(event: str = "*", table: str = "events", flt: str | None = None) -> Any:
    raw: dict[str, Any] = {"event": event, "schema": "public", "table": table}
    if flt is not None:
        raw["filter"] = flt
    return parse_bindings([raw])[0]


def test_match_on_event_schema_table() -> None:
    assert matches(bind(), change())
    assert matches(bind("INSERT"), change("INSERT"))
    assert not matches(bind("INSERT"), change("UPDATE"))
    assert matches(bind(table="*"), change(table="other"))
    assert not matches(bind(), change(table="other"))
    assert not matches(bind(), {**change(), "schema": "audit"})
    # Supabase: * matches any schema (and any table).
    (anywhere,) = parse_bindings([{"event": "*", "schema": "*", "table": "*"}])
    assert matches(anywhere, {**change(), "schema": "audit", "table": "x"})
    (any_schema,) = parse_bindings([{"schema": "*", "table": "events"}])
    assert matches(any_schema, {**change(), "schema": "audit"})
    assert not matches(any_schema, {**change(), "schema": "audit", "table": "x"})


def test_unmatched_names_the_bindings_no_tracked_table_answers() -> None:
    tracked = frozenset({("public", "todos"), ("audit", "log")})
    bindings = parse_bindings(
        [
            {"schema": "public", "table": "todos"},
            {"schema": "public", "table": "*"},
            {"schema": "*", "table": "log"},
            {"schema": "*", "table": "*"},
            {"schema": "public", "table": "log"},
            {"schema": "other", "table": "*"},
            {"schema": "*", "table": "nope"},
        ]
    )
    assert [(b.schema, b.table) for b in unmatched(bindings, tracked)] == [
        ("public", "log"),
        ("other", "*"),
        ("*", "nope"),
    ]
    assert [(b.schema, b.table) for b in unmatched(bindings, frozenset())] == [
        (b.schema, b.table) for b in bindings
    ]


@pytest.mark.parametrize(
    ("flt", "record", "expected"),
    [
        ("org_id=eq.42", {"org_id": 42}, True),
        ("org_id=eq.42", {"org_id": 43}, False),
        ("org_id=eq.42", {"org_id": "42"}, True),
        ("org_id=eq.42", {}, False),
        ("org_id=eq.42", {"org_id": None}, False),
        ("n=neq.1", {"n": 2}, True),
        ("n=lt.10", {"n": 9}, True),
        ("n=lt.10", {"n": 10}, False),
        ("n=lte.10", {"n": 10}, True),
        ("n=gt.10", {"n": 10.5}, True),
        ("n=gte.10", {"n": 9}, False),
        ("n=gt.abc", {"n": 1}, False),
        ("done=eq.true", {"done": True}, True),
        ("done=eq.false", {"done": True}, False),
        ("id=in.(1,2,3)", {"id": 2}, True),
        ("id=in.(1,2,3)", {"id": 4}, False),
        ("s=in.(a,b)", {"s": "b"}, True),
    ],
)
def test_match_filters(flt: str, record: dict[str, Any], expected: bool) -> None:
    assert matches(bind(flt=flt), change(**record)) is expected


def test_delete_filters_on_old_record() -> None:
    assert matches(bind("DELETE", flt="id=eq.7"), change("DELETE", id=7))
    assert not matches(bind("DELETE", flt="id=eq.7"), change("DELETE", id=8))
