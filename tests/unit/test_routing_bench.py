"""`rayfleet bench routing`'s pure parts: saturation and the precise-vs-round-robin summary."""

from __future__ import annotations

from typing import Any

from rayfleet.benchmarks.routing_live import saturated, summarize


def _run(mode: str, rate: float | str, req_s: float, tok_s: float, p90: float) -> dict[str, Any]:
    return {
        "mode": mode,
        "rate": rate,
        "request_throughput": req_s,
        "output_tok_s": tok_s,
        "ttft_s": {"p50": p90 / 2, "p90": p90},
    }


def test_saturated_when_served_below_offered() -> None:
    assert not saturated(_run("round_robin", 16.0, 15.5, 0, 0.1))
    assert saturated(_run("round_robin", 64.0, 30.0, 0, 3.0))
    assert saturated(_run("round_robin", "inf", 30.0, 0, 3.0))


def test_summary_compares_precise_with_round_robin_per_rate() -> None:
    rows = summarize(
        [
            _run("round_robin", 64.0, 30.0, 1920.0, 4.0),
            _run("prefix_precise", 64.0, 63.0, 4032.0, 0.2),
            _run("least_loaded", 64.0, 31.0, 1984.0, 3.5),
        ]
    )
    assert len(rows) == 1 and rows[0]["rate"] == 64.0
    assert rows[0]["modes"]["round_robin"]["saturated"]
    assert not rows[0]["modes"]["prefix_precise"]["saturated"]
    vs = rows[0]["precise_over_round_robin"]
    assert vs["throughput"] == 4032.0 / 1920.0 and vs["ttft_p90_reduction"] == 20.0
