"""The event store: an append-only log per org, the source of truth for
durable events.

* :mod:`hub.store.base`: the store interface, the stored event, the checks
  both stores apply, and :class:`~hub.store.base.StoreError`.
* :mod:`hub.store.memory`: the embedded default, in process and bounded.
* :mod:`hub.store.postgres`: the production store on PostgreSQL (pool,
  appends and reads).
* :mod:`hub.store.listener`: the PostgreSQL store's LISTEN supervisor, which
  turns NOTIFYs into ordered, gap-free announcements.
* :mod:`hub.store.relay`: the best-effort NOTIFY relay (ordered, bounded,
  large payloads read back) that the next two use.
* :mod:`hub.store.broadcasts`: broadcasts sent from the database
  (``realtime.send()``), relayed by the same LISTEN connection, best effort.
* :mod:`hub.store.rowchanges`: rows of tables tracked without an org
  column, relayed the same way.
* :mod:`hub.store.pgjson`: JSON as PostgreSQL sends and takes it.
* :mod:`hub.store.migrate`: the schema migrations.
* :mod:`hub.store.tracking`: change capture from app tables.
"""
