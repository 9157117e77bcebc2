"""Speculation planning with hand-fed timings: exact costs, exact decisions. Pure Python."""

from __future__ import annotations

import math

import pytest

from rayfleet.replicas.spec.adaptive import (
    AcceptanceTracker,
    AdaptiveSpecPolicy,
    CostCurve,
    drafts_worth,
    expected_tokens,
    plan_speculation,
)


def curve(*points: tuple[int, float]) -> CostCurve:
    c = CostCurve()
    for n, t in points:
        c.observe(n, t)
    return c


def test_cost_curve_interpolates_flat_below_proportional_above() -> None:
    c = curve((4, 0.010), (64, 0.020), (256, 0.080))  # one sample per bucket
    assert c(1) == 0.010  # flat below the smallest size seen
    assert c(4) == 0.010
    assert c(34) == pytest.approx(0.015)  # linear between 4 and 64
    assert c(128) == pytest.approx(0.040)
    assert c(512) == pytest.approx(0.160)  # proportional above the largest
    assert CostCurve()(8) is None


def test_cost_curve_averages_within_a_bucket() -> None:
    c = CostCurve(ema=0.5)
    c.observe(8, 1.000)  # a first run paying for compilation: replaced by the second sample
    c.observe(8, 0.010)
    assert c(8) == pytest.approx(0.010)
    c.observe(9, 0.020)  # same half-octave bucket as 8: averaged from now on
    assert c.count_near(8) == 3 and c.count_near(16) == 0
    assert c(8.5) == pytest.approx(0.015)
    c.observe(8, 0.0)  # ignored: not a measurement
    assert c.count_near(8) == 3


def test_expected_tokens_and_drafts_worth() -> None:
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == 1.875
    assert drafts_worth(0.8, 0.5, cap=8) == 3  # 0.8^3 = 0.512 >= 0.5 > 0.8^4
    assert drafts_worth(0.8, 0.5, cap=2) == 2
    assert drafts_worth(0.5, 0.5, cap=8) == 1  # exact powers count
    assert drafts_worth(0.0, 0.05, cap=8) == 0
    assert drafts_worth(1.0, 0.9, cap=5) == 5


def test_batch_one_memory_bound_speculates_deep() -> None:
    # Target flat at 10 ms up to 8 tokens, draft 1 ms per forward.
    target = curve((1, 0.010), (8, 0.010), (64, 0.020))
    draft = curve((1, 0.001))
    plan = plan_speculation(
        [0.8], [4], num_requests=1, base_tokens=1, target_time=target, draft_time=draft
    )
    # k=1: 1.8 tok / 11 ms; k=2: 2.44 / 12; k=3: 2.952 / 13; k=4: 3.3616 / 14 ms -> best.
    assert plan.num_spec == [4]
    assert plan.tokens_per_s == pytest.approx(3.3616 / 0.014)
    assert plan.off_tokens_per_s == pytest.approx(100.0)


def test_large_compute_bound_batch_turns_speculation_off() -> None:
    target = curve((1, 0.010), (64, 0.020), (256, 0.080))
    draft = curve((1, 0.001), (64, 0.004))
    plan = plan_speculation(
        [0.5] * 64, [4] * 64, num_requests=64, base_tokens=64, target_time=target, draft_time=draft
    )
    # Off: 64 / 20 ms = 3200 tok/s. Best speculative plan (k=1): 96 / (40 + 4) ms = 2182 tok/s.
    assert plan.num_spec == [0] * 64
    assert plan.tokens_per_s == pytest.approx(3200.0)


def test_low_acceptance_request_gets_no_drafts() -> None:
    target = curve((1, 0.010), (8, 0.010))
    draft = curve((1, 0.001), (2, 0.002))  # a second drafting request doubles the draft cost
    plan = plan_speculation(
        [0.9, 0.1], [4, 4], num_requests=2, base_tokens=2, target_time=target, draft_time=draft
    )
    # [4, 0]: (2 + 0.9 + 0.81 + 0.729 + 0.6561) / (10 + 4 * 1) ms beats [4, 1]: +0.1 tokens for
    # 4 ms more draft time.
    assert plan.num_spec == [4, 0]
    assert plan.tokens_per_s == pytest.approx((2 + 0.9 + 0.81 + 0.729 + 0.6561) / 0.014)


def test_marginal_gain_below_min_gain_stays_off() -> None:
    target = curve((1, 0.010), (2, 0.0195))
    draft = curve((1, 0.0001))
    # k=1 at rate 0.05 would give 1.05 tokens per 19.6 ms: slower than 1 per 10 ms.
    plan = plan_speculation(
        [0.05], [1], num_requests=1, base_tokens=1, target_time=target, draft_time=draft
    )
    assert plan.num_spec == [0]


def test_unmeasured_target_speculates_to_learn() -> None:
    plan = plan_speculation(
        [0.6], [3], num_requests=1, base_tokens=1, target_time=CostCurve(), draft_time=CostCurve()
    )
    # UNMEASURED_THRESHOLD 0.3: 0.6^2 >= 0.3 > 0.6^3
    assert plan.num_spec == [2] and math.isinf(plan.tokens_per_s)


def test_acceptance_tracker_counts_tried_positions() -> None:
    t = AcceptanceTracker(prior=0.6, prior_weight=2.0, decay=0.5)
    assert t.rate("a") == pytest.approx(0.6)
    t.observe("a", drafted=4, accepted=1)  # positions 1 (accepted) and 2 (rejected) were tried
    g = (0.99 * 6.0 + 1) / (0.99 * 10.0 + 2)
    assert t.global_rate == pytest.approx(g)
    assert t.rate("a") == pytest.approx((1 + 2 * g) / (2 + 2))
    t.observe("a", drafted=3, accepted=3)  # all tried, all accepted
    assert t.rate("a") == pytest.approx((0.5 * 1 + 3 + 2 * t.global_rate) / (0.5 * 2 + 3 + 2))
    t.idle("a")  # evidence fades toward the prior
    assert t.rate("a") == pytest.approx((1.75 + 2 * t.global_rate) / (2.0 + 2))
    t.forget("a")
    assert t.rate("a") == pytest.approx(t.global_rate)


def test_policy_explores_speculation_off_before_trusting_extrapolation() -> None:
    policy = AdaptiveSpecPolicy(4, explore_interval=2, min_samples=2, refresh_interval=10)
    cands = [("a", 4), ("b", 4)]
    # Nothing measured at all: speculate (and so measure).
    assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 2, "b": 2}
    policy.observe_target(100, 0.050)  # a prefill step
    policy.observe_target(6, 0.010)
    policy.observe_draft(2, 0.001)
    # Batch of 2 never measured without drafts: one speculation-off step to measure it.
    assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 0, "b": 0}
    policy.observe_target(2, 0.010)
    # One sample < min_samples: trusted until explore_interval plans have passed. At rate 0.6,
    # k=2 gives 3.92 tokens / (10 + 2 * 1) ms; k=3: 4.352 / 13.85 ms (T(8) interpolated to 100).
    assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 2, "b": 2}
    assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 0, "b": 0}
    policy.observe_target(2, 0.010)
    for _ in range(9):
        assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 2, "b": 2}
    assert policy.plan(cands, num_requests=2, base_tokens=2) == {"a": 0, "b": 0}  # refresh


def test_policy_switches_a_bad_request_off_and_retries_it_later() -> None:
    policy = AdaptiveSpecPolicy(3, tracker=AcceptanceTracker(prior=0.7, decay=0.9))
    policy.observe_target(1, 0.010)
    policy.observe_target(2, 0.010)
    policy.observe_target(8, 0.010)
    policy.observe_draft(1, 0.002)
    policy.observe_draft(2, 0.0025)
    cands = [("good", 3), ("bad", 3)]
    for _ in range(6):
        policy.observe_verification("good", 3, 3)
        policy.observe_verification("bad", 3, 0)
    plan = policy.plan(cands, num_requests=2, base_tokens=2)
    # "bad" at ~0.12: its one draft adds 0.12 tokens but 25% to every draft forward.
    assert plan["good"] == 3 and plan["bad"] == 0
    # Idle steps fade "bad"'s evidence toward the (high) replica-wide rate until it is retried.
    for _ in range(20):
        if policy.plan(cands, num_requests=2, base_tokens=2)["bad"]:
            break
    else:
        pytest.fail("a request switched off is never retried")


def test_policy_probes_speculation_after_a_long_off_streak() -> None:
    policy = AdaptiveSpecPolicy(4, probe_interval=5)
    for n, t in ((1, 0.010), (1, 0.010), (2, 0.010), (2, 0.010)):
        policy.observe_target(n, t)
    for _ in range(2):  # an unlucky draft measurement makes speculation look hopeless
        policy.observe_draft(1, 1.0)
    cands = [("a", 4)]
    decisions = [policy.plan(cands, num_requests=1, base_tokens=1)["a"] for _ in range(10)]
    # Off for 4 plans, then one probe at the unmeasured threshold (0.6^2 >= 0.3), and again.
    assert decisions == [0, 0, 0, 0, 2, 0, 0, 0, 0, 2]
