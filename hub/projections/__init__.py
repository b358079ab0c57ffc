"""Read models folded from the event log: the catalog and the runner."""
