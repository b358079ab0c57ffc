"""Engines carry messages between the hub's channels, on one node or many.

The channels registry never talks to another node itself: it hands every
broadcast and presence change to the engine and receives what the engine
delivers.  :mod:`hub.engine.memory` delivers in-process; a Redis engine can
sit behind the same interface without changes to channels or sessions.
"""
