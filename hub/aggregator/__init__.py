"""The mother aggregator (rolling counters across every org) lives here; see issue 5."""
