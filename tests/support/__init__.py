"""Harness code the tests share: set-ups that wire parts of a node the way
hub/node.py does, servers started for real, and their helpers."""
