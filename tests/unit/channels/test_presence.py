"""PresenceTable: Phoenix.Presence semantics for one topic."""

from __future__ import annotations

from typing import Any

from hub.channels.presence import PresenceDiff, PresenceTable


class Owner:
    """An opaque hashable owner, as a subscription is."""


def metas(diff_part: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return list(diff_part[key]["metas"])


def test_track_returns_a_join_with_phx_ref() -> None:
    table = PresenceTable("org:42")
    owner = Owner()
    diff = table.track(owner, "alice", {"name": "Alice"})
    assert diff.topic == "org:42"
    assert diff.leaves == {}
    (meta,) = metas(diff.joins, "alice")
    assert meta["name"] == "Alice"
    assert isinstance(meta["phx_ref"], str)
    assert meta["phx_ref"]
    assert "phx_ref_prev" not in meta
    assert diff.payload() == {"joins": diff.joins, "leaves": {}}
    assert bool(diff)
    assert len(table) == 1
    assert table.state() == {"alice": {"metas": [meta]}}


def test_fields_are_copied_and_client_phx_ref_is_overwritten() -> None:
    table = PresenceTable("t")
    fields = {"phx_ref": "forged", "x": 1}
    diff = table.track(Owner(), "k", fields)
    (meta,) = metas(diff.joins, "k")
    assert meta["phx_ref"] != "forged"
    assert fields == {"phx_ref": "forged", "x": 1}
    fields["x"] = 2
    assert table.state()["k"]["metas"][0]["x"] == 1


def test_refs_are_unique_and_carry_the_prefix() -> None:
    table = PresenceTable("t", ref_prefix="node-a.")
    refs = [metas(table.track(Owner(), "k", {}).joins, "k")[0]["phx_ref"] for _ in range(5)]
    assert len(set(refs)) == 5
    assert all(ref.startswith("node-a.") for ref in refs)
    other = PresenceTable("t", ref_prefix="node-b.")
    other_ref = metas(other.track(Owner(), "k", {}).joins, "k")[0]["phx_ref"]
    assert other_ref not in refs


def test_retrack_is_a_leave_plus_a_join_with_phx_ref_prev() -> None:
    table = PresenceTable("t")
    owner = Owner()
    first = metas(table.track(owner, "alice", {"status": "away"}).joins, "alice")[0]
    diff = table.track(owner, "alice", {"status": "online"})
    assert diff.leaves == {"alice": {"metas": [first]}}
    (new,) = metas(diff.joins, "alice")
    assert new["status"] == "online"
    assert new["phx_ref_prev"] == first["phx_ref"]
    assert new["phx_ref"] != first["phx_ref"]
    # One owner holds one meta.
    assert len(table) == 1
    assert table.state() == {"alice": {"metas": [new]}}


def test_retrack_under_another_key_moves_the_meta() -> None:
    table = PresenceTable("t")
    owner = Owner()
    old = metas(table.track(owner, "a", {}).joins, "a")[0]
    diff = table.track(owner, "b", {})
    assert diff.leaves == {"a": {"metas": [old]}}
    assert list(diff.joins) == ["b"]
    assert list(table.state()) == ["b"]


def test_one_key_many_owners() -> None:
    table = PresenceTable("t")
    first, second = Owner(), Owner()
    m1 = metas(table.track(first, "user-1", {"tab": 1}).joins, "user-1")[0]
    m2 = metas(table.track(second, "user-1", {"tab": 2}).joins, "user-1")[0]
    assert table.state() == {"user-1": {"metas": [m1, m2]}}
    assert len(table) == 2
    leave = table.untrack(first)
    assert leave.leaves == {"user-1": {"metas": [m1]}}
    assert leave.joins == {}
    assert table.state() == {"user-1": {"metas": [m2]}}


def test_untrack() -> None:
    table = PresenceTable("t")
    owner = Owner()
    meta = metas(table.track(owner, "k", {"a": 1}).joins, "k")[0]
    diff = table.untrack(owner)
    assert diff.joins == {}
    assert diff.leaves == {"k": {"metas": [meta]}}
    assert len(table) == 0
    assert table.state() == {}
    again = table.untrack(owner)
    assert not again
    assert again.payload() == {"joins": {}, "leaves": {}}


def test_untrack_of_a_stranger_is_empty() -> None:
    table = PresenceTable("t")
    table.track(Owner(), "k", {})
    assert not table.untrack(Owner())
    assert len(table) == 1


def test_every_meta_in_state_has_a_phx_ref() -> None:
    table = PresenceTable("t")
    owners = [Owner() for _ in range(4)]
    for i, owner in enumerate(owners):
        table.track(owner, f"k{i % 2}", {"i": i})
    table.track(owners[0], "k0", {"i": 10})
    table.untrack(owners[1])
    state = table.state()
    all_metas = [meta for entry in state.values() for meta in entry["metas"]]
    assert len(all_metas) == 3
    assert all(isinstance(m["phx_ref"], str) and m["phx_ref"] for m in all_metas)
    assert len({m["phx_ref"] for m in all_metas}) == 3


def test_empty_diff_is_falsy() -> None:
    assert not PresenceDiff("t")
    assert PresenceDiff("t", leaves={"k": {"metas": [{"phx_ref": "1"}]}})


# -- other nodes' entries ----------------------------------------------------------


def remote_join(key: str, ref: str, **fields: Any) -> PresenceDiff:
    return PresenceDiff("t", joins={key: {"metas": [{"phx_ref": ref, **fields}]}})


def remote_leave(key: str, ref: str) -> PresenceDiff:
    return PresenceDiff("t", leaves={key: {"metas": [{"phx_ref": ref}]}})


def test_remote_entries_are_mirrored_and_idempotent() -> None:
    table = PresenceTable("t", ref_prefix="a.")
    local = metas(table.track(Owner(), "alice", {}).joins, "alice")[0]
    effective = table.apply_remote("b", remote_join("bob", "b.1", n=1))
    assert effective.joins == {"bob": {"metas": [{"phx_ref": "b.1", "n": 1}]}}
    assert table.state() == {
        "alice": {"metas": [local]},
        "bob": {"metas": [{"phx_ref": "b.1", "n": 1}]},
    }
    # The same information twice changes nothing.
    assert not table.apply_remote("b", remote_join("bob", "b.1", n=1))
    assert len(table) == 2
    assert table.local_count == 1
    # Only this node's own entries are offered to others.
    assert table.local_state() == {"alice": {"metas": [local]}}


def test_a_node_cannot_remove_another_nodes_or_local_entries() -> None:
    table = PresenceTable("t", ref_prefix="a.")
    local = metas(table.track(Owner(), "alice", {}).joins, "alice")[0]
    table.apply_remote("b", remote_join("bob", "b.1"))
    assert not table.apply_remote("c", remote_leave("bob", "b.1"))
    assert not table.apply_remote("c", remote_leave("alice", local["phx_ref"]))
    assert len(table) == 2
    effective = table.apply_remote("b", remote_leave("bob", "b.1"))
    assert list(effective.leaves) == ["bob"]
    assert list(table.state()) == ["alice"]


def test_malformed_remote_entries_are_skipped() -> None:
    table = PresenceTable("t")
    diff = PresenceDiff(
        "t",
        joins={
            "no-ref": {"metas": [{"x": 1}]},
            "int-ref": {"metas": [{"phx_ref": 5}]},
            "not-list": {"metas": "x"},
            "not-dict": "x",
            "ok": {"metas": [{"phx_ref": "b.9"}, "junk"]},
        },
    )
    effective = table.apply_remote("b", diff)
    assert effective.joins == {"ok": {"metas": [{"phx_ref": "b.9"}]}}
    state = table.state()
    assert list(state) == ["ok"]


def test_replace_node_and_drop_node() -> None:
    table = PresenceTable("t")
    table.apply_remote("b", remote_join("bob", "b.1"))
    table.apply_remote("b", remote_join("bea", "b.2"))
    snapshot = {"bob": {"metas": [{"phx_ref": "b.1"}]}, "bo": {"metas": [{"phx_ref": "b.3"}]}}
    effective = table.replace_node("b", snapshot)
    assert effective.leaves == {"bea": {"metas": [{"phx_ref": "b.2"}]}}
    assert effective.joins == {"bo": {"metas": [{"phx_ref": "b.3"}]}}
    assert not table.replace_node("b", snapshot)
    gone = table.drop_node("b")
    assert set(gone.leaves) == {"bob", "bo"}
    assert table.state() == {}
