"""JSON as PostgreSQL sends and takes it: the codec of the ``json`` and
``jsonb`` columns of the store's pool, and the decoder of the payloads the
LISTEN connection receives."""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(text: str | bytes) -> Any:
    """Decode JSON from PostgreSQL.  orjson is fast but refuses numbers out
    of double range, which ``numeric`` columns of a tracked table can hold."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
