"""The scale model is arithmetic on a run's figures: checked on made-up ones."""

from __future__ import annotations

from typing import Any

from loadtest.bench import scale


def _results() -> dict[str, Any]:
    def regime(rate: float) -> dict[str, Any]:
        return {"deliveries_per_server_cpu_s": rate}

    return {
        "machine": {"date": "2026-12-04 03:00 UTC"},
        "scenarios": {
            "fanout": {
                "hub": {
                    "saturated": regime(4e6),
                    "burst": regime(5e6),
                    "paced": regime(3e6),
                    "fixed_rate": regime(1.4e5),
                    # With --runs, each regime's own median run is used.
                    "regime_medians": {"fixed_rate": regime(1.5e5)},
                }
            },
            "capacity": {"hub": {"kb_per_conn": 4.0, "connects_joins_per_server_cpu_s": 3000}},
            "multinode": {
                "hub": {
                    "nodes": 2,
                    "saturated": {
                        "deliveries_per_server_cpu_s": 3e6,
                        "redis_cpu_s": 0.02,
                        "messages": 5000,
                    },
                    "fixed_rate": {"redis_cpu_s": 0.2, "messages": 2000},
                }
            },
        },
    }


def test_the_model_multiplies_measured_figures() -> None:
    m = scale.model(_results(), cores=16, nodes=10, shards=3, open_files=20_000)
    assert m["per_core"] == {"burst": 5e6, "paced": 3e6, "one per 10 ms": 1.5e5}
    assert m["redis_us_per_message_node"] == 2.0  # 20 ms / 5,000 messages / 2 nodes
    assert m["redis_us_per_message_node_alone"] == 50.0
    assert m["multinode_ratio"] == 0.75
    assert m["processes_per_machine"] == 15 and m["conns_per_process"] == 19_000
    text = scale.render(m, "a test")
    # 15 processes x 19,000 connections, and 10 machines of them.
    assert "| joined connections | 19,000 | 285,000 | 2,850,000 |" in text
    # 1 / 2 us = 500,000 message-process pairs per Redis core per second.
    assert "| every process of one machine (15) | 33,333 | 100,000 |" in text
