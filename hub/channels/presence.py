"""Presence: who is on a topic, as Phoenix.Presence shows it.

State is ``{key: {"metas": [meta, ...]}}`` and every meta carries a unique
``phx_ref`` (realtime-py's receive loop dies on a meta without one).  A
re-track replaces the owner's meta: the diff leaves the old one and joins
the new one, which carries ``phx_ref_prev``.  No I/O.
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
    """Joins and leaves on one topic, in the shape of ``presence_diff``."""

    topic: str
    joins: PresenceMap = field(default_factory=dict)
    leaves: PresenceMap = field(default_factory=dict)

    def payload(self) -> dict[str, PresenceMap]:
        return {"joins": self.joins, "leaves": self.leaves}

    def __bool__(self) -> bool:
        return bool(self.joins or self.leaves)


class PresenceTable:
    """The presence of one topic.  Owners are opaque hashable tokens (the
    hub uses subscriptions); each owner holds at most one meta."""

    def __init__(self, topic: str, ref_prefix: str = "") -> None:
        self.topic = topic
        self._ref_prefix = ref_prefix
        self._refs = itertools.count(1)
        #: key -> phx_ref -> meta, in arrival order.
        self._keys: dict[str, dict[str, Meta]] = {}
        #: owner -> (key, phx_ref)
        self._owners: dict[Hashable, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def _remove(self, owner: Hashable) -> tuple[str, Meta] | None:
        held = self._owners.pop(owner, None)
        if held is None:
            return None
        key, ref = held
        metas = self._keys[key]
        meta = metas.pop(ref)
        if not metas:
            del self._keys[key]
        return key, meta

    def track(self, owner: Hashable, key: str, fields: dict[str, Any]) -> PresenceDiff:
        """Track (or re-track) ``owner`` under ``key`` with ``fields``."""
        diff = PresenceDiff(self.topic)
        meta: Meta = dict(fields)
        previous = self._remove(owner)
        if previous is not None:
            old_key, old_meta = previous
            diff.leaves[old_key] = {"metas": [old_meta]}
            meta["phx_ref_prev"] = old_meta["phx_ref"]
        ref = f"{self._ref_prefix}{next(self._refs)}"
        meta["phx_ref"] = ref
        self._keys.setdefault(key, {})[ref] = meta
        self._owners[owner] = (key, ref)
        diff.joins[key] = {"metas": [meta]}
        return diff

    def untrack(self, owner: Hashable) -> PresenceDiff:
        """Remove ``owner``'s meta; an empty diff if it held none."""
        diff = PresenceDiff(self.topic)
        previous = self._remove(owner)
        if previous is not None:
            key, meta = previous
            diff.leaves[key] = {"metas": [meta]}
        return diff

    def state(self) -> PresenceMap:
        return {key: {"metas": list(metas.values())} for key, metas in self._keys.items()}
