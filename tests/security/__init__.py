"""Hostile-input tests: tokens, topics and REST, each inside an arena
(tests/support/arena.py) that checks no byte crossed between orgs."""
