"""Presence: who is on a topic, as Phoenix.Presence shows it.

State is ``{key: {"metas": [meta, ...]}}`` and every meta carries a unique
``phx_ref`` (realtime-py's receive loop dies on a meta without one).  A
re-track replaces the owner's meta: the diff leaves the old one and joins
the new one, which carries ``phx_ref_prev``.

A table holds this node's own entries (owned by subscriptions) and mirrors
of other nodes' entries (owned by the node's id), fed by the engine.  Every
change returns the diff that subscribers must see; applying the same remote
information twice yields an empty diff, so re-syncs are harmless.  No I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

Meta = dict[str, Any]
PresenceMap = dict[str, dict[str, list[Meta]]]


@dataclass(slots=True)
class PresenceDiff:
    """Joins and leaves on one topic, in the shape of ``presence_diff``.

    ``node`` is None for a change made on this node, else the node it came
    from (the engine sets it on arrival).
    """

    topic: str
    joins: PresenceMap = field(default_factory=dict)
    leaves: PresenceMap = field(default_factory=dict)
    node: str | None = None

    def payload(self) -> dict[str, PresenceMap]:
        return {"joins": self.joins, "leaves": self.leaves}

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)


def _add(target: PresenceMap, key: str, meta: Meta) -> None:
    target.setdefault(key, {"metas": []})["metas"].append(meta)


def _metas(presence: Any) -> list[tuple[str, Meta]]:
    """(key, meta) pairs of a presence map from another node; malformed
    entries are skipped, never trusted."""
    pairs: list[tuple[str, Meta]] = []
    if not isinstance(presence, dict):
        return pairs
    for key, entry in presence.items():
        metas = entry.get("metas") if isinstance(entry, dict) else None
        if isinstance(key, str) and isinstance(metas, list):
            pairs.extend(
                (key, meta)
                for meta in metas
                if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str)
            )
    return pairs


class PresenceTable:
    """The presence of one topic on this node, own and mirrored."""

    def __init__(self, topic: str, ref_prefix: str = "") -> None:
        self.topic = topic
        self._ref_prefix = ref_prefix
        self._refs = itertools.count(1)
        #: phx_ref -> (key, meta, owner); insertion order is display order.
        self._entries: dict[str, tuple[str, Meta, Hashable]] = {}
        #: local owner (a subscription) -> its phx_ref
        self._owned: dict[Hashable, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def local_count(self) -> int:
        return len(self._owned)

    def _remove_ref(self, ref: str, diff: PresenceDiff) -> Meta | None:
        entry = self._entries.pop(ref, None)
        if entry is None:
            return None
        key, meta, owner = entry
        if self._owned.get(owner) == ref:
            del self._owned[owner]
        _add(diff.leaves, key, meta)
        return meta

    # -- this node's subscriptions ------------------------------------------

    def track(self, owner: Hashable, key: str, fields: dict[str, Any]) -> PresenceDiff:
        """Track (or re-track) ``owner`` under ``key`` with ``fields``."""
        diff = PresenceDiff(self.topic)
        meta: Meta = dict(fields)
        previous = self._owned.get(owner)
        if previous is not None:
            old = self._remove_ref(previous, diff)
            if old is not None:
                meta["phx_ref_prev"] = old["phx_ref"]
        ref = f"{self._ref_prefix}{next(self._refs)}"
        meta["phx_ref"] = ref
        self._entries[ref] = (key, meta, owner)
        self._owned[owner] = ref
        _add(diff.joins, key, meta)
        return diff

    def untrack(self, owner: Hashable) -> PresenceDiff:
        """Remove ``owner``'s meta; an empty diff if it held none."""
        diff = PresenceDiff(self.topic)
        ref = self._owned.get(owner)
        if ref is not None:
            self._remove_ref(ref, diff)
        return diff

    def local_state(self) -> PresenceMap:
        """This node's own entries, for another node's re-sync."""
        state: PresenceMap = {}
        for ref in self._owned.values():
            key, meta, _ = self._entries[ref]
            _add(state, key, meta)
        return state

    # -- other nodes ---------------------------------------------------------

    def apply_remote(self, node: str, diff: PresenceDiff) -> PresenceDiff:
        """Apply another node's diff; returns what actually changed here."""
        effective = PresenceDiff(self.topic, node=node)
        for _, meta in _metas(diff.leaves):
            entry = self._entries.get(meta["phx_ref"])
            if entry is not None and entry[2] == node:
                self._remove_ref(meta["phx_ref"], effective)
        for key, meta in _metas(diff.joins):
            if meta["phx_ref"] not in self._entries:
                self._entries[meta["phx_ref"]] = (key, meta, node)
                _add(effective.joins, key, meta)
        return effective

    def replace_node(self, node: str, state: Any) -> PresenceDiff:
        """Make ``node``'s mirrored entries exactly ``state`` (a snapshot)."""
        effective = PresenceDiff(self.topic, node=node)
        fresh = {meta["phx_ref"]: (key, meta) for key, meta in _metas(state)}
        for ref, (_, _, owner) in list(self._entries.items()):
            if owner == node and ref not in fresh:
                self._remove_ref(ref, effective)
        for ref, (key, meta) in fresh.items():
            if ref not in self._entries:
                self._entries[ref] = (key, meta, node)
                _add(effective.joins, key, meta)
        return effective

    def drop_node(self, node: str) -> PresenceDiff:
        """Forget every entry of ``node`` (it died or left)."""
        return self.replace_node(node, {})

    def state(self) -> PresenceMap:
        state: PresenceMap = {}
        for key, meta, _ in self._entries.values():
            _add(state, key, meta)
        return state
