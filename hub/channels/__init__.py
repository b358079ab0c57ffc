"""Channels: topic grammar, subscriptions, fan-out, presence and change bindings."""
