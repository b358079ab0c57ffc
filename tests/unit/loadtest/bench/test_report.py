"""The results page: every peer of the fan-out's regimes as a ratio to the hub."""

from __future__ import annotations

from typing import Any

from loadtest.bench import report


def _regime(rate: float, p99: float) -> dict[str, Any]:
    return {
        "deliveries_per_server_cpu_s": rate,
        "latency_ms": {"p50": p99 / 2, "p99": p99, "max": p99 * 2, "samples": 10},
        "delivered": 10,
        "expected": 10,
        "server_cpu_s": 1.0,
        "server_kernel_cpu_s": 0.75,
        "loadgen_cpu_s": 0.5,
    }


def _run(burst: float, paced: float, fixed: float, p99: float) -> dict[str, Any]:
    return {
        "client": "native",
        "burst": _regime(burst, p99),
        "paced": _regime(paced, p99),
        "fixed_rate": _regime(fixed, p99),
    }


def _rows(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines
        if line.startswith("| ") and not line.startswith("| regime")
    ]
    return {(r[0], r[1]): r for r in rows}


def test_each_peer_is_a_ratio_to_the_hub_in_each_regime() -> None:
    rows = _rows(
        report.regimes_table(
            {
                "hub": _run(3e6, 2e6, 1e5, 10.0),
                "bun": _run(1.5e6, 4e6, 1.5e5, 5.0),
                "floor": _run(12e6, 4e6, 2e5, 20.0),
            }
        )
    )
    burst, paced, fixed = (label for _, label in report.REGIMES)
    assert rows[(burst, "`hub`")][3] == "1.00x"
    assert rows[(burst, "`bun`")][3] == "0.50x"
    assert rows[(burst, "`floor`")][3] == "4.00x"
    assert rows[(paced, "`bun`")][3] == "2.00x"
    assert rows[(fixed, "`floor`")][3] == "2.00x"
    # p99 as a ratio too: lower is better.
    assert rows[(fixed, "`bun`")][5] == "0.50x"
    assert rows[(fixed, "`floor`")][5] == "2.00x"
    # Server CPU per delivery: its own code, then the kernel's part.
    assert rows[(fixed, "`floor`")][8] == "25000.00 / 75000.00"
    assert rows[(fixed, "`floor`")][9] == "native"


def test_a_skipped_regime_says_why_and_a_failed_server_is_left_out() -> None:
    slow = _run(0, 0, 4e4, 5000.0)
    slow["burst"] = slow["paced"] = {"skipped": "not run: too slow"}
    lines = report.regimes_table(
        {"hub": _run(3e6, 2e6, 1e5, 10.0), "socketio": slow, "channels": {"error": "boom"}}
    )
    rows = _rows(lines)
    burst = report.REGIMES[0][1]
    assert rows[(burst, "`socketio`")][2] == "not run: too slow"
    # Its error is listed under the saturated table (fanout_table).
    assert not any(name == "`channels`" for _, name in rows)


def test_with_several_runs_each_regime_row_is_that_regimes_median_run() -> None:
    def full(saturated: float, burst: float, paced: float) -> dict[str, Any]:
        run = _run(burst, paced, 1e5, 10.0)
        run["saturated"] = {"deliveries_per_server_cpu_s": saturated}
        return run

    # The saturated median (run b) is neither regime's median.
    runs = [full(1.0, 30.0, 200.0), full(2.0, 10.0, 300.0), full(3.0, 20.0, 100.0)]
    chosen = report.median_run("fanout", runs)
    assert chosen["saturated"]["deliveries_per_server_cpu_s"] == 2.0
    assert chosen["regime_medians"]["burst"]["deliveries_per_server_cpu_s"] == 20.0
    assert chosen["regime_medians"]["paced"]["deliveries_per_server_cpu_s"] == 200.0
    rows = _rows(report.regimes_table({"hub": chosen}))
    assert rows[(report.REGIMES[0][1], "`hub`")][2] == "20"


def test_multinode_shows_redis_cpu_per_message_and_node() -> None:
    def phase(messages: int, redis: float) -> dict[str, Any]:
        return {**_regime(1e6, 10.0), "messages": messages, "redis_cpu_s": redis, "bound": "x"}

    run = {"nodes": 2, "saturated": phase(5000, 0.02), "fixed_rate": phase(2000, 0.012)}
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in report.fanout_table({"hub": run}, "Multi-node", multinode=True)
        if line.startswith("| `hub`")
    ]
    # 20 ms over 5,000 messages to 2 nodes; 12 ms over 2,000 to 2.
    assert rows[0][5] == "2.0 / 3.0"
