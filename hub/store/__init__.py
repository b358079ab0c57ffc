"""The event store: an append-only log per org, the source of truth for
durable events.  :mod:`hub.store.memory` for the embedded default,
:mod:`hub.store.postgres` for production."""
