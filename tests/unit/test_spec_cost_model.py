"""Speculation planning with hand-fed timings: exact costs, exact decisions. Pure Python."""

from __future__ import annotations

import math
import random
from collections import deque

import pytest

from rayfleet.replicas.spec.adaptive import (
    AcceptanceTracker,
    AdaptiveSpecPolicy,
    CostCurve,
    Plan,
    drafts_worth,
    expected_max_normal,
    expected_tokens,
    plan_speculation,
    tokens_variance,
)
from rayfleet.replicas.spec.adaptive import _bucket as adaptive_bucket


def curve(*points: tuple[int, float]) -> CostCurve:
    c = CostCurve()
    for n, t in points:
        c.observe(n, t)
    return c


def test_cost_curve_interpolates_flat_below_along_the_last_segment_above() -> None:
    c = curve((4, 0.010), (64, 0.020), (256, 0.080))  # one sample per bucket
    assert c(1) == 0.010  # flat below the smallest size seen
    assert c(4) == 0.010
    assert c(34) == pytest.approx(0.015)  # linear between 4 and 64
    assert c(128) == pytest.approx(0.040)
    assert c(512) == pytest.approx(0.160)  # 0.080 + 256 * (0.060 / 192)
    # Memory bound: a verification of 6 tokens costs what the flat curve says, not 6x.
    small = curve((1, 0.008), (3, 0.0082))
    assert small(6) == pytest.approx(0.0082 + 3 * 0.0001)
    assert curve((8, 0.010))(100) == 0.010  # one point: flat (optimistic: tried, then measured)
    assert curve((1, 0.010), (8, 0.009))(64) == 0.009  # never decreasing
    assert CostCurve()(8) is None


def test_sync_overhead_curve_stays_flat_past_its_largest_batch() -> None:
    """H's samples at small batches are near 0 and noisy once the host's work hides behind the
    draft (H100: 0.0 ms at 5 requests, 1.6 ms at 8): the slope between two of them would price
    batch 64 at 32 ms of host work and speculation out of a batch where it wins 1.22x. The
    policy's H curve is flat above its largest measured batch; T and D keep their slope."""
    points = ((5, 0.0), (5, 1e-6), (8, 0.0016), (8, 0.0016))
    slope = curve(*points)
    flat = CostCurve(extrapolate=False)
    for n, t in points:
        flat.observe(n, t)
    assert slope(64) > 0.02
    assert flat(64) == pytest.approx(0.0016) and flat(8) == slope(8)
    assert flat(6) == pytest.approx(slope(6))  # interpolation unchanged
    policy = AdaptiveSpecPolicy(4)
    assert not policy.overhead.extrapolate and policy.target.extrapolate


def test_a_step_holding_a_draft_catch_up_gives_no_overhead_sample() -> None:
    """A proposal's catch-up prefill is reported when its ids reach the host, in the step whose
    wall time holds it; D leaves it out, so that step's H would count it as host work: that
    step gives no H (or realized-rate) sample, the next one does."""
    policy = AdaptiveSpecPolicy(4)
    full = Plan([2] * 64, 1.0, 1.0, verify_s=0.009, draft_s=0.004)
    policy._prev_full = policy._full = full
    policy.observe_catchup(8256, 0.034)
    policy.observe_step(64, 0.047, num_tokens=150)
    assert not policy.overhead and not policy.realized
    policy.observe_step(64, 0.0135, num_tokens=150)
    assert policy.overhead.count_near(64) == 1
    assert sum(len(w) for w in policy.realized.values()) == 1
    for _ in range(2):  # (a bucket of H counts from its third observation)
        policy.observe_step(64, 0.0135, num_tokens=150)
    assert policy.overhead(64) == pytest.approx(0.0005)


def test_chained_proposals_keep_their_own_sync_overhead() -> None:
    """A step whose proposal was chained behind its verification (plan(chained=True)) samples
    H into its own curve, and a chained plan is priced with it: at 0.5 acceptance the 8 ms a
    proposal made after the result adds keeps speculation off, while the chained proposal's
    0.1 ms lets k = 2 win (the costs of test_sync_overhead_is_priced_into_every_speculating_plan).
    """
    policy = AdaptiveSpecPolicy(4)
    policy.target = curve((1, 0.010), (8, 0.010), (64, 0.020))
    policy.draft = curve((1, 0.001), (1, 0.001))  # (settled: past its provisional sample)
    policy._prev_full = policy._full = Plan([2], 1.0, 1.0, verify_s=0.010, draft_s=0.002)
    for chained, wall in ((False, 0.020), (True, 0.0121)):
        policy._full_chained = chained
        for _ in range(3):
            policy.observe_step(1, wall)
    assert policy.overhead(1) == pytest.approx(0.008)
    assert policy.overhead_chained(1) == pytest.approx(0.0001)
    assert policy._price([0.5], [4], 1, 1, 4).num_spec == [0]
    assert policy._price([0.5], [4], 1, 1, 4, chained=True).num_spec == [2]
    # a dry verdict cannot tell how its steps would propose: the larger of the two
    assert policy._overhead(1, None) == pytest.approx(0.008)
    assert policy._overhead(64, True) == pytest.approx(0.0001)  # (flat past batch 1)
    for chained in (True, False):  # the plan records which curve its step's sample feeds
        policy.plan([("r", 4)], num_requests=1, base_tokens=1, max_padded_k=4, chained=chained)
        assert policy._full_chained is chained


def test_cost_curve_median_of_recent_samples() -> None:
    c = CostCurve(window=3)
    c.observe(8, 1.000)  # a first run paying for compilation: replaced by the second sample
    c.observe(8, 0.010)
    assert c(8) == pytest.approx(0.010)
    c.observe(9, 0.500)  # one slow outlier (same half-octave bucket) moves nothing much
    c.observe(8, 0.012)
    assert c.count_near(8) == 4 and c.count_near(16) == 0
    assert c(8.333) == pytest.approx(0.012)  # median of 0.010, 0.500, 0.012 at mean size 8.33
    c.observe(8, 0.020)  # the window keeps the last 3: 0.500, 0.012, 0.020
    assert c.points() == [(pytest.approx(25 / 3), 0.020)]
    c.observe(8, 0.0)  # ignored: not a measurement
    assert c.count_near(8) == 5


def test_one_outlier_beside_one_sample_does_not_set_the_median_bucket() -> None:
    """The default curve (T and D): of two samples (after the provisional first) an outlier
    does not move the bucket to their mean; timing noise only adds time."""
    h = CostCurve(extrapolate=False)
    for seconds in (0.002, 0.001, 0.012):  # provisional, then a normal step and a stalled one
        h.observe(8, seconds)
    assert h(8) == 0.001
    h.observe(8, 0.0011)
    assert h(8) == 0.0011  # three samples: the median


def test_sync_overhead_takes_the_lower_quartile_of_its_samples() -> None:
    """H is host wall time: stalls add milliseconds to sub-millisecond samples. Two stalled
    steps among three (the H100's batch-8 pattern that kept speculation off for a run) do not
    set the bucket; T and D keep the lower median."""
    policy = AdaptiveSpecPolicy(max_k=8)
    for seconds in (0.004, 0.0005, 0.0065, 0.0096):  # provisional, one normal step, two stalls
        policy.overhead.observe(8, seconds)
    assert policy.overhead(8) == 0.0005
    for seconds in (0.0004, 0.0006, 0.0007, 0.0080, 0.0090):  # a full window of 8
        policy.overhead.observe(8, seconds)
    # sorted: 0.0004 0.0005 0.0006 0.0007 0.0065 0.008 0.009 0.0096 -> index floor(7 / 4) = 1
    assert policy.overhead(8) == 0.0005
    curve = CostCurve(quantile=0.0)
    for seconds in (0.003, 0.002, 0.001, 0.004):
        curve.observe(4, seconds)
    assert curve(4) == 0.001
    assert CostCurve().quantile == 0.5 and policy.target.quantile == policy.draft.quantile == 0.5
    with pytest.raises(ValueError, match="quantile"):
        CostCurve(quantile=1.5)


def test_an_h_bucket_counts_from_its_third_observation() -> None:
    """The H100 run where greedy steps were chained and the plain curve got only the rare
    unchained ones: one 10 ms sample at batch 3 and one 24 ms at 54 priced H(8) at ~13 ms and
    kept a sampled batch of 8 off. Such buckets stand for nothing until a third observation;
    batch 8 reads the measured batch-1 H (flat past it)."""
    policy = AdaptiveSpecPolicy(max_k=8)
    h = policy.overhead
    assert h.min_count == 3 and policy.overhead_chained.min_count == 3
    for _ in range(3):
        h.observe(1, 0.0004)
    for size, seconds in ((3, 0.0102), (3, 0.0102), (54, 0.0239)):  # two observations at 3
        h.observe(size, seconds)
    assert h(8) == pytest.approx(0.0004) and h.points() == [(1.0, 0.0004)]
    h.observe(3, 0.0007)  # the third: the bucket counts, at its lower quartile
    assert h(3) == pytest.approx(0.0007)
    assert CostCurve(min_count=2)(1) is None and CostCurve().min_count == 1


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


def test_sync_overhead_is_priced_into_every_speculating_plan() -> None:
    # The same costs as above, but a speculating step also pays 8 ms of host work that a
    # speculation-off step overlaps: k=4 gives 3.3616 / 22 ms = 152.8 tok/s, k=3 2.952 / 21 =
    # 140.6, still beating off (100); at 0.5 acceptance k=1..4 give at most 1.9375 / 22 = 88.1:
    # off, although without the overhead k=2 (1.75 / 12 = 145.8) would have won.
    target = curve((1, 0.010), (8, 0.010), (64, 0.020))
    draft = curve((1, 0.001))
    kw = dict(num_requests=1, base_tokens=1, target_time=target, draft_time=draft)
    plan = plan_speculation([0.8], [4], overhead=0.008, **kw)
    assert plan.num_spec == [4]
    assert (plan.verify_s, plan.draft_s) == pytest.approx((0.010, 0.004))
    assert plan.tokens_per_s == pytest.approx(3.3616 / 0.022)
    assert plan_speculation([0.5], [4], **kw).num_spec == [2]
    off = plan_speculation([0.5], [4], overhead=0.008, **kw)
    assert off.num_spec == [0] and off.verify_s == off.draft_s == 0.0


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


def test_padded_verification_prices_every_row_and_drafts_max_k() -> None:
    """With a verification graph every request computes 1 + max k rows: drafting requests then
    get max k (no extra target cost), and the padded token count is what is priced."""
    target = curve((4, 0.0044), (20, 0.0060))  # 4 ms + 0.1 ms per token
    draft = curve((2, 1e-6))
    rates, caps = [0.9, 0.9, 0.1, 0.1], [4] * 4
    kw = dict(num_requests=4, base_tokens=4, target_time=target, draft_time=draft)
    eager = plan_speculation(rates, caps, **kw)
    # 4 + 2 * (0.9 + 0.81 + 0.729 + 0.6561) tokens for 12 tokens of verification.
    assert eager.num_spec == [4, 4, 0, 0]
    assert eager.tokens_per_s == pytest.approx(10.1902 / 0.0052, rel=1e-3)
    padded = plan_speculation(rates, caps, max_padded_k=4, **kw)
    # 20 rows either way: the 0.1 requests' drafts ride along for free.
    assert padded.num_spec == [4, 4, 4, 4]
    assert padded.tokens_per_s == pytest.approx(10.4124 / 0.0060, rel=1e-3)
    # Beyond the graphs (max_padded_k) the eager pricing applies again.
    assert plan_speculation(rates, caps, max_padded_k=3, **kw).num_spec == [4, 4, 0, 0]


def test_policy_explores_off_first_then_the_shallowest_unmeasured_verification() -> None:
    def target(n: int) -> float:  # 10 ms, +0.5 ms per token past 4
        return 0.010 + 5e-4 * max(0, n - 4)

    policy = AdaptiveSpecPolicy(4, explore_interval=2, min_samples=2, refresh_interval=12)
    cands = [("a", 4), ("b", 4)]
    decisions = []
    for _ in range(16):
        plan = policy.plan(cands, num_requests=2, base_tokens=2)
        n = 2 + sum(plan.values())
        policy.observe_target(n, target(n))
        if any(plan.values()):
            policy.observe_draft(2, 0.001)
        decisions.append(plan["a"])
        assert plan["a"] == plan["b"]
    # 1: nothing measured: off, measuring T(2). 2: T is flat above its one point, so the deepest
    # plan looks best, but T(2 + 2k) was never measured: k = 1 first (the shallowest unmeasured
    # size). 3: T(2) has 1 sample < min_samples: measured again. 4: the slope T(2) -> T(4) says
    # nothing yet about T(6): k = 2 is tried. Then at rate 0.6 k = 2 wins on measured costs
    # (3.92 tokens / 13 ms against 3.2 / 11 ms and 4.352 / 15 ms), until the refresh at plan 15.
    assert decisions == [0, 1, 0, 2] + [2] * 10 + [0, 2]
    st = policy.stats
    assert (st.explores_off, st.explores_on, st.speculating) == (3, 2, 13)


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


def test_policy_probes_after_off_streaks_that_double() -> None:
    policy = AdaptiveSpecPolicy(4, probe_interval=3, max_probe_interval=8)
    for n, t in ((1, 0.010), (1, 0.010), (2, 0.010), (2, 0.010)):
        policy.observe_target(n, t)
    for _ in range(2):  # an unlucky draft measurement makes speculation look hopeless
        policy.observe_draft(1, 1.0)
    cands = [("a", 4)]
    decisions = [policy.plan(cands, num_requests=1, base_tokens=1)["a"] for _ in range(26)]
    # Probes (two drafts) after 3, then 6, then 8 (the cap) off plans: a probe that does not
    # turn speculation back on makes the next one wait longer.
    probes = [i for i, k in enumerate(decisions) if k]
    assert probes == [2, 8, 16, 24] and all(decisions[i] == 2 for i in probes)
    assert policy.stats.probes == 4


def test_a_win_at_one_batch_size_restarts_only_its_own_probe_schedule() -> None:
    """Speculation pays for 1 request (a cheap single draft) and not for 2 (a batched draft
    forward measured at a second). Probes at 2 requests back off (3, 6, then 8 plans apart);
    a measured win at 1 request in between does not bring the batch-2 probes back to every 3."""
    policy = AdaptiveSpecPolicy(4, probe_interval=3, max_probe_interval=8)
    for n in (1, 1, 2, 2, 3, 3, 4, 4, 6, 6, 8, 8, 10, 10):
        policy.observe_target(n, 0.010)
    for n, t in ((1, 1e-4), (1, 1e-4), (2, 1.0), (2, 1.0)):
        policy.observe_draft(n, t)
    two = [("a", 4), ("b", 4)]
    decisions = []
    for i in range(40):
        if i in (12, 20, 28):  # a speculating plan for one request
            assert policy.plan([("c", 4)], num_requests=1, base_tokens=1)["c"] > 0
        decisions.append(any(policy.plan(two, num_requests=2, base_tokens=2).values()))
    probes = [i for i, on in enumerate(decisions) if on]
    # (the off streak is counted per bucket too: the wins at 1 request leave batch 2's alone)
    assert probes == [2, 8, 16, 24, 32]
    assert policy.stats.probes == 5


def hopeless_policy(**kw) -> AdaptiveSpecPolicy:
    """Measured costs that keep speculation off (an unlucky draft measurement)."""
    policy = AdaptiveSpecPolicy(4, **kw)
    for n, t in ((1, 0.010), (1, 0.010), (2, 0.010), (2, 0.010)):
        policy.observe_target(n, t)
    for _ in range(2):
        policy.observe_draft(1, 1.0)
    return policy


def test_paused_only_after_an_off_plan_for_a_batch_of_that_size() -> None:
    policy = hopeless_policy()
    assert not policy.speculation_paused(1)  # no plan yet
    assert policy.plan([("a", 4)], num_requests=1, base_tokens=1) == {"a": 0}
    assert policy.speculation_paused(1)
    assert not policy.speculation_paused(2)  # another half-octave bucket: plan again
    # A plan that drafts ends the pause.
    on = AdaptiveSpecPolicy(4)
    on.observe_target(1, 0.010)
    on.observe_target(1, 0.010)
    on.observe_draft(1, 0.001)
    assert on.plan([("a", 4)], num_requests=1, base_tokens=1)["a"] > 0
    assert not on.speculation_paused(1)


def test_a_dry_plan_carries_the_pause_to_another_bucket() -> None:
    """The batch leaves the paused bucket (requests finish, a burst arrives): the policy prices
    a decode step of the batch the engine hands over, and if that is off the step stays
    paused (no synchronous step just to plan). The batch is read only when the bucket
    changed."""
    policy = hopeless_policy()
    for n in (3, 3, 64, 64):
        policy.observe_target(n, 0.010)
    assert policy.plan([("a", 4)], num_requests=1, base_tokens=1) == {"a": 0}

    def unread():
        raise AssertionError("the batch is read only when the bucket changed")

    assert policy.speculation_paused(1, unread)
    assert not policy.speculation_paused(2)  # no batch given: plan
    two = lambda: ([("a", 4), ("b", 4)], [(0, 20), (0, 20)])  # noqa: E731
    assert policy.speculation_paused(2, two)
    assert policy.stats.dry_off == 1
    assert policy.speculation_paused(2, unread)  # bucket 2 is now the paused one
    # A burst of 64 arrivals the runner holds none of: priced at the replica-wide rate.
    assert policy.speculation_paused(64, lambda: ([], []))
    assert policy.stats.dry_off == 2
    # Not at a size whose T was never measured (its decode steps explore first).
    assert not policy.speculation_paused(16, lambda: ([], []))
    assert policy.stats.dry_off == 2
    # Every request near its end: paused, but the bucket is not (the next step prices again).
    near_end = lambda: ([("a", 2)] * 3, [(0, 2)] * 3)  # noqa: E731
    assert policy.speculation_paused(3, near_end)
    assert not policy.speculation_paused(3)
    assert policy.stats.dry_off == 3


def test_a_due_probe_waits_for_a_decode_step() -> None:
    """A probe runs only in a decode plan: while the steps carry prompt chunks a due probe does
    not make them synchronous; the first decode step is planned (and probes)."""
    policy = hopeless_policy(probe_interval=3)
    cands = [("a", 4)]
    assert policy.plan(cands, num_requests=1, base_tokens=1) == {"a": 0}
    policy.skip_plan()
    assert not policy.speculation_paused(1)  # the next plan is the probe
    assert policy.speculation_paused(1, prefill=True)
    policy.skip_plan()
    assert not policy.speculation_paused(1)
    assert policy.plan(cands, num_requests=1, base_tokens=1) == {"a": 2}
    assert policy.stats.probes == 1


def test_a_dry_plan_that_would_speculate_leaves_the_step_to_a_plan() -> None:
    """Off for one request (one draft forward costs a second), on for two (a cheap batched
    draft): leaving bucket 1 for 2, the dry plan speculates, so the step is planned."""
    policy = AdaptiveSpecPolicy(4)
    for n in (1, 1, 2, 2):
        policy.observe_target(n, 0.010)
    for n, t in ((1, 1.0), (1, 1.0), (2, 1e-5), (2, 1e-5)):
        policy.observe_draft(n, t)
    assert policy.plan([("a", 4)], num_requests=1, base_tokens=1) == {"a": 0}
    assert policy.speculation_paused(1)
    two = lambda: ([("a", 4), ("b", 4)], [(0, 20), (0, 20)])  # noqa: E731
    assert not policy.speculation_paused(2, two)
    assert any(policy.plan(two()[0], num_requests=2, base_tokens=2).values())
    assert policy.stats.dry_off == 0


def test_one_early_rejection_pauses_a_batch_1_request_only_briefly() -> None:
    """Speculation pays at the replica-wide rate (0.9) but not for a request whose first draft
    was rejected (its rate falls to 0.6). That off plan pauses for ``explore_interval`` steps,
    not ``pause_replan_interval``; the plans after it fade the evidence and speculation
    resumes within a few more plans."""
    policy = AdaptiveSpecPolicy(8, tracker=AcceptanceTracker(prior=0.9), explore_interval=4)
    for n, t in ((1, 0.0059), (1, 0.0059), (9, 0.007), (9, 0.007)):
        policy.observe_target(n, t)
    for _ in range(2):
        policy.observe_draft(1, 0.003)
    cands = [("a", 8)]
    assert policy.plan(cands, num_requests=1, base_tokens=1)["a"] > 0
    policy.observe_verification("a", 8, 0)
    assert policy.plan(cands, num_requests=1, base_tokens=1) == {"a": 0}
    paused = 0
    while policy.speculation_paused(1):
        policy.skip_plan()
        paused += 1
    assert paused == 4
    for _ in range(8):
        if policy.plan(cands, num_requests=1, base_tokens=1)["a"] > 0:
            break
        while policy.speculation_paused(1):
            policy.skip_plan()
    else:
        pytest.fail("the request stays off")


def test_paused_steps_replan_every_interval() -> None:
    policy = hopeless_policy(pause_replan_interval=4)
    policy.plan([("a", 4)], num_requests=1, base_tokens=1)
    paused = []
    for _ in range(10):
        if policy.speculation_paused(1):
            policy.skip_plan()
            paused.append(True)
        else:
            assert policy.plan([("a", 4)], num_requests=1, base_tokens=1) == {"a": 0}
            paused.append(False)
    assert paused == [True] * 4 + [False] + [True] * 4 + [False]
    assert policy.stats.skipped == 8 and policy.stats.plans == 3


def test_a_due_replan_priced_off_by_a_dry_plan_keeps_the_pause() -> None:
    """When a long pause is due its re-plan, a dry plan that prices the batch off keeps the step
    overlapped (no synchronous step just to plan) and does an off plan's bookkeeping: the
    skipped count restarts and the requests' evidence fades (toward the replica-wide rate, as
    idle plans fade it). A dry plan that would speculate leaves the step to a real plan."""
    policy = hopeless_policy(pause_replan_interval=4)
    cands = [("a", 4)]
    batch = lambda: (cands, [(0, 100)])  # noqa: E731
    policy.tracker.observe("a", 4, 0)
    low = policy.tracker.rate("a")
    assert policy.plan(cands, num_requests=1, base_tokens=1) == {"a": 0}
    steps = []
    for _ in range(10):
        steps.append(policy.speculation_paused(1, batch))
        if steps[-1]:
            policy.skip_plan()
    assert steps == [True] * 10 and policy.stats.plans == 1 and policy.stats.dry_off == 2
    assert policy.tracker.rate("a") > low
    # the same re-plan with a draft that became free: the step is planned
    for _ in range(3):
        policy.observe_draft(1, 1e-6)
    policy.tracker.observe("a", 4, 4)
    while policy.speculation_paused(1, batch):
        policy.skip_plan()
    assert any(policy.plan(cands, num_requests=1, base_tokens=1).values())


def test_skipped_plans_keep_the_probe_schedule() -> None:
    """Steps paused (no plan) count as speculation-off plans: the probes come at the same steps
    as with a plan every step (test_policy_probes_after_off_streaks_that_double), and the step
    before each probe is not paused."""
    policy = hopeless_policy(probe_interval=3, max_probe_interval=8)
    cands = [("a", 4)]
    decisions = []
    for _ in range(26):
        if policy.speculation_paused(1):
            policy.skip_plan()
            decisions.append(None)
        else:
            decisions.append(policy.plan(cands, num_requests=1, base_tokens=1)["a"])
    probes = [i for i, k in enumerate(decisions) if k]
    assert probes == [2, 8, 16, 24] and all(decisions[i] == 2 for i in probes)
    assert policy.stats.probes == 4 and policy.stats.skipped > 10
    # Planned: the first step, each probe and the off plan after it (it ends the probe's
    # speculating step); paused: everything else.
    planned = [i for i, k in enumerate(decisions) if k is not None]
    assert planned == [0, 2, 3, 8, 9, 16, 17, 24, 25]


def test_a_due_exploration_is_planned_after_paused_steps() -> None:
    """Paused steps advance the plan count that drives refreshes of T(n_base): the refresh comes
    due while paused and the next plan (after pause_replan_interval) takes it."""
    policy = hopeless_policy(refresh_interval=5, pause_replan_interval=8)
    policy._explored_at[0] = 0  # T(1) was explored at the start (hopeless_policy measured it)
    assert policy.plan([("a", 4)], num_requests=1, base_tokens=1) == {"a": 0}  # an off plan
    explores = policy.stats.explores_off
    assert explores == 0
    for _ in range(8):
        assert policy.speculation_paused(1)
        policy.skip_plan()
    assert not policy.speculation_paused(1)
    policy.plan([("a", 4)], num_requests=1, base_tokens=1)
    assert policy.stats.explores_off == explores + 1
    # An exploration is one measurement, not an off decision: the next step plans again.
    assert not policy.speculation_paused(1)


# ---- closed loop: the policy against a synthetic engine ------------------------------------------
def h100_like_target(n: float) -> float:
    """An 8B-like target step: 8 ms memory-bound floor, 40 us per token past 128 tokens."""
    return 0.008 + max(0.0, n - 128) * 40e-6


def h100_like_draft(m: float) -> float:
    """A 1B-like draft forward over m requests, one token each."""
    return 0.001 + max(0.0, m - 64) * 6e-6


def accept(policy, rng: random.Random, rate: float, plan: dict[str, int]) -> dict[str, int]:
    """Drafts accepted per request of ``plan`` (i.i.d. acceptance ``rate``), reported to the
    policy."""
    accepted = {}
    for rid, k in plan.items():
        a = 0
        while a < k and rng.random() < rate:
            a += 1
        if k:
            policy.observe_verification(rid, k, a)
        accepted[rid] = a
    return accepted


def simulate(
    policy,
    batch: int,
    rate: float,
    steps: int,
    *,
    prompt_len: int = 128,
    draft_prefill_per_token: float = 4e-6,
    seed: int = 0,
) -> tuple[float, int]:
    """Decode ``batch`` requests for ``steps`` steps under ``policy``, every request padded to
    the step's longest query (verification graphs); acceptance is i.i.d. ``rate`` per draft.
    A drafting request's draft first catches up (a prefill) on the tokens it has not seen.
    Returns (output tokens per second, steps that speculated)."""
    rng = random.Random(seed)
    rids = [f"r{i}" for i in range(batch)]
    plan = {rid: 0 for rid in rids}
    behind = dict.fromkeys(rids, prompt_len)  # tokens the draft has not seen, per request
    tokens = 0
    seconds = 0.0
    spec_steps = 0
    for _ in range(steps):
        k_max = max(plan.values())
        n = batch * (1 + k_max)
        t = h100_like_target(n)
        policy.observe_target(n, t)
        for rid, a in accept(policy, rng, rate, plan).items():
            tokens += a + 1
            behind[rid] = 1 if plan[rid] and a < plan[rid] else behind[rid] + a + 1
        plan = policy.plan(
            [(rid, 5) for rid in rids], num_requests=batch, base_tokens=batch, max_padded_k=5
        )
        k_next = max(plan.values())
        if k_next:
            spec_steps += 1
            drafting = [rid for rid in rids if plan[rid]]
            d = h100_like_draft(len(drafting))
            fed = sum(behind[rid] for rid in drafting)
            if max(behind[rid] for rid in drafting) <= 3:  # else a catch-up (proposer.py)
                policy.observe_draft(len(drafting), d)
            t += k_next * d + max(fed - 2 * len(drafting), 0) * draft_prefill_per_token
            for rid in drafting:
                behind[rid] = 1
        seconds += t
    return tokens / seconds, spec_steps


@pytest.mark.parametrize("batch,rate,speedup", [(1, 0.9, 2.6), (8, 0.7, 1.7), (64, 0.7, 1.35)])
def test_closed_loop_speculates_where_it_wins(batch: int, rate: float, speedup: float) -> None:
    """Where speculation wins, the policy gets close to the best fixed k (batch 1 at 0.9:
    k = 5, 4.69 tokens per 8 + 5 ms, 2.89x; batch 64 at 0.7: k = 1, 1.7 tokens per request per
    9 ms, 1.51x) within 128 steps of a cold start."""
    off_rate = batch / h100_like_target(batch)
    got, spec_steps = simulate(AdaptiveSpecPolicy(5), batch=batch, rate=rate, steps=128)
    assert got > speedup * off_rate
    assert spec_steps == 128


@pytest.mark.parametrize("rate", [0.5, 0.7, 0.9])
def test_closed_loop_large_batch_is_never_slower_than_off(rate: float) -> None:
    batch = 256
    off_rate = batch / h100_like_target(batch)
    cold = AdaptiveSpecPolicy(5)
    got, spec_steps = simulate(cold, batch=batch, rate=rate, steps=128)
    # A fresh policy measures one verification of 2 tokens per request, drafting for a few
    # requests only (their catch-up prefill is small); its measurements then keep it off.
    assert spec_steps == 1 and cold.stats.explores_on == 1
    assert got > 0.985 * off_rate
    # With the cost curves learnt (here: by the run above) nothing speculates: the first probe
    # at batch 256 comes after 128 x 256 / 16 = 2048 off plans; at batch 16, after 128.
    warm = AdaptiveSpecPolicy(5)
    warm.target, warm.draft = cold.target, cold.draft
    got, spec_steps = simulate(warm, batch=batch, rate=rate, steps=128, seed=1)
    assert spec_steps == 0 and warm.stats.probes == 0
    assert got > 0.999 * off_rate
    assert [warm._probe_interval_at(n) for n in (1, 16, 64, 256, 1024)] == [
        128,
        128,
        512,
        2048,
        4096,  # max_probe_interval
    ]


def simulate_engine(
    policy,
    batch: int,
    rate: float,
    steps: int,
    *,
    host_s: float,
    seed: int = 0,
) -> tuple[float, int]:
    """``simulate`` with the engine's timing and pausing: a step that plans runs synchronously
    and pays ``host_s`` of host work that the cost model's target and draft timings leave out;
    a paused step (speculation_paused, then skip_plan) overlaps that work with the device and
    costs the target step only. Every step is reported to ``observe_step``. Draft catch-up is
    free here. Returns (output tokens per second, steps that speculated)."""
    rng = random.Random(seed)
    rids = [f"r{i}" for i in range(batch)]
    plan = dict.fromkeys(rids, 0)
    tokens = 0
    seconds = 0.0
    spec_steps = 0
    for _ in range(steps):
        k_max = max(plan.values())
        n = batch * (1 + k_max)
        t = h100_like_target(n)
        step_tokens = sum(a + 1 for a in accept(policy, rng, rate, plan).values())
        if not k_max and policy.speculation_paused(batch):
            policy.skip_plan()
            plan = dict.fromkeys(rids, 0)
        else:
            policy.observe_target(n, t)
            t += host_s
            plan = policy.plan(
                [(rid, 5) for rid in rids], num_requests=batch, base_tokens=batch, max_padded_k=5
            )
            k_next = max(plan.values())
            if k_next:
                spec_steps += 1
                drafting = sum(1 for k in plan.values() if k)
                d = h100_like_draft(drafting)
                policy.observe_draft(drafting, d)
                t += k_next * d
        policy.observe_step(batch, t, step_tokens)
        tokens += step_tokens
        seconds += t
    return tokens / seconds, spec_steps


def test_measured_sync_overhead_turns_off_what_the_forwards_alone_misprice() -> None:
    """Batch 96 at acceptance 0.9 with 6 ms of host work per synchronous step. The forwards
    alone price k = 1 at 182.4 tokens per 10.56 + 1.19 ms = 15.5k tok/s against 12.0k off (96
    per 8 ms), a 1.29x gain, but a speculating step really takes 17.75 ms (10.3k tok/s) while a
    paused step hides the host work. Blind to it, the policy speculates throughout and is 14%
    slower than off; H, measured on the steps between full speculating plans (a bucket counts
    from its third observation: two samples past the provisional one), turns it off after
    four, and the probes (a few requests, two drafts) keep it off."""
    batch, rate, host = 96, 0.9, 0.006
    off_rate = batch / h100_like_target(batch)

    def policy() -> AdaptiveSpecPolicy:  # acceptance already known: 0.9 everywhere
        return AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9))

    blind = policy()
    blind.observe_step = lambda num_requests, seconds, num_tokens=0: None  # type: ignore[method-assign]
    got_blind, spec_blind = simulate_engine(blind, batch, rate, 512, host_s=host)
    assert spec_blind > 500 and got_blind < 0.91 * off_rate
    aware = policy()
    got, spec_steps = simulate_engine(aware, batch, rate, 512, host_s=host)
    assert aware.overhead(batch) == pytest.approx(host)
    assert got > 0.98 * off_rate
    assert spec_steps - aware.stats.probes - aware.stats.explores_on == 4


def test_measured_sync_overhead_keeps_a_winning_plan() -> None:
    """Batch 1 at acceptance 0.9, 0.5 ms of host work: speculation wins by far after its host
    work too, and, once measured, an exploration does not pause it for 32 steps."""
    policy = AdaptiveSpecPolicy(5)
    off_rate = 1 / h100_like_target(1)
    got, spec_steps = simulate_engine(policy, 1, 0.9, 256, host_s=0.0005)
    assert policy.overhead(1) == pytest.approx(0.0005)
    assert spec_steps >= 250 and got > 2.3 * off_rate


class DeafCurve(CostCurve):
    """A curve that never learns (a cost the model cannot see)."""

    def observe(self, size: int, seconds: float) -> None:
        pass


def test_realized_rates_veto_what_the_cost_model_misprices() -> None:
    """The batch-96 case above with the sync overhead H hidden from the model too: the forwards
    alone price k = 1 at 1.29x, but a speculating step yields 10.3k tok/s against 12.0k off.
    The realized rate of the first 4 steps between full plans vetoes speculation; the retrials
    (after 128 plans, then 256, 512, ...) re-measure it with 5 speculating steps each."""
    batch, rate, host = 96, 0.9, 0.006
    off_rate = batch / h100_like_target(batch)
    policy = AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9))
    policy.overhead = DeafCurve()
    got, spec_steps = simulate_engine(policy, batch, rate, 2048, host_s=host)
    assert policy.overhead(batch) is None
    # realized: 96 * (1 + 0.9 + ...) tokens per verification + drafts + 6 ms of host work
    assert 0.85 * off_rate < policy._realized(batch) < off_rate
    retrials = 4  # at plans ~128, ~384, ~896, ~1920
    assert policy.stats.vetoed >= 1
    assert spec_steps - policy.stats.probes - policy.stats.explores_on <= 5 * (1 + retrials)
    assert got > 0.97 * off_rate
    # without the veto (the same blindness) speculation runs throughout, 14% slower
    blind = AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9), min_realized=10**9)
    blind.overhead = DeafCurve()
    got_blind, spec_blind = simulate_engine(blind, batch, rate, 512, host_s=host)
    assert spec_blind > 500 and got_blind < 0.91 * off_rate


def test_realized_rates_keep_a_plan_that_wins() -> None:
    """Batch 1 at 0.9: single steps yield 1 to 6 tokens; the realized rate (summed over recent
    steps) stays far above speculation off, so nothing is vetoed."""
    policy = AdaptiveSpecPolicy(5)
    got, spec_steps = simulate_engine(policy, 1, 0.9, 512, host_s=0.0005)
    assert policy.stats.vetoed == 0
    assert policy._realized(1) > 2.3 / h100_like_target(1)
    assert spec_steps >= 500


def warm_policy(batch: int) -> AdaptiveSpecPolicy:
    """Curves measured at ``batch`` (decode, verifications up to k = 5, drafts)."""
    policy = AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9))
    for k in range(6):
        for _ in range(2):
            policy.observe_target(batch * (1 + k), h100_like_target(batch * (1 + k)))
    for _ in range(2):
        policy.observe_draft(batch, h100_like_draft(batch))
    return policy


def test_prefill_steps_speculate_only_where_their_decode_batch_would() -> None:
    """A step with prefill chunks drafts only if decode steps of the batch it grows into would
    (same curves, same acceptance) and full plans there have realized a win: 64 requests
    decoding while 192 more prefill, in a batch of 256, draft nothing; in a batch of 8 they
    draft once speculation at 8 realized its gain, not before."""
    rids = [(f"r{i}", 5) for i in range(64)]
    big = warm_policy(256)
    plan = big.plan(
        rids, num_requests=64, base_tokens=64 + 8192, steady_requests=256, steady_padded_k=5
    )
    assert not any(plan.values()) and big.stats.prefill_off == 1
    assert big.speculation_paused(256)  # the prefill steps that follow run overlapped
    assert not any(big.plan(rids, num_requests=256, base_tokens=256, max_padded_k=5).values())
    small = warm_policy(8)
    prefill = dict(num_requests=4, base_tokens=4 + 512, steady_requests=8, steady_padded_k=5)
    assert not any(small.plan(rids[:4], **prefill).values())  # nothing realized at 8 yet
    off_rate = 8 / h100_like_target(8)
    small.realized[adaptive_bucket(8)] = deque([(2 * off_rate, 1.0)] * 4, maxlen=16)
    plan = small.plan(rids[:4], **prefill)
    assert all(plan.values()) and small.stats.prefill_off == 1
    # unmeasured there: off during prefill (decode steps explore, prefill steps cannot measure)
    cold = AdaptiveSpecPolicy(5)
    plan = cold.plan(rids[:4], num_requests=4, base_tokens=516, steady_requests=8)
    assert not any(plan.values())


def test_prefill_without_realized_evidence_does_not_pause_its_decode_steps() -> None:
    """Batch 8 is priced on but no full plan there has realized anything yet: its prefill steps
    draft nothing and run overlapped, and its first decode step plans (and drafts), instead of
    waiting out a pause meant for batches priced off."""
    rids = [(f"r{i}", 5) for i in range(8)]
    batch = lambda: (rids, [(0, 100)] * 8)  # noqa: E731
    for via_plan in (True, False):
        policy = warm_policy(8)
        if via_plan:
            prefill = dict(num_requests=4, base_tokens=4 + 512, steady_requests=8)
            assert not any(policy.plan(rids[:4], **prefill, steady_padded_k=5).values())
        else:
            assert policy.speculation_paused(8, batch, 5, prefill=True)
            policy.skip_plan()
        assert policy.speculation_paused(8, batch, 5, prefill=True)  # more prompt chunks
        policy.skip_plan()
        assert not policy.speculation_paused(8, batch, 5)  # a decode step: plan
        assert all(policy.plan(rids, num_requests=8, base_tokens=8, max_padded_k=5).values())


def test_draft_catch_up_is_priced_over_the_tokens_left() -> None:
    """64 requests whose drafts fell 130 tokens behind (speculation was off); a catch-up forward
    measured at 1 ms for 128 tokens and 33 ms for 8192 (a 1B draft: a fixed cost, then ~4 us
    per token). Feeding all 64 lags (8320 tokens) costs 33 ms (flat past the largest size
    measured: tried, it is measured there). With 3 tokens left each,
    that is paid within one step for at most 2 extra tokens per request: no drafts. With 500
    left, it is spread over the 32-step horizon (1 ms per step): the plan still drafts."""
    rids = [(f"r{i}", 5) for i in range(64)]
    policy = warm_policy(64)
    policy.observe_catchup(128, 0.001)
    policy.observe_catchup(8192, 0.033)
    in_sync = policy.plan(rids, num_requests=64, base_tokens=64, max_padded_k=5)
    in_sync_rate = policy.last_plan.tokens_per_s
    ending = policy.plan(
        [(rid, 2) for rid, _ in rids],
        num_requests=64,
        base_tokens=64,
        max_padded_k=5,
        draft_lag=[(130, 3)] * 64,
    )
    assert not any(ending.values())
    long_left = policy.plan(
        rids, num_requests=64, base_tokens=64, max_padded_k=5, draft_lag=[(130, 500)] * 64
    )
    # still drafts, deeper (a fixed cost per step favours more tokens per step: k = 3, not 2)
    assert set(in_sync.values()) == {2} and set(long_left.values()) == {3}
    assert policy.last_plan.tokens_per_s < in_sync_rate
    # a lag the proposal feeds anyway (the last step's k + 1 tokens) costs nothing extra
    assert policy._catchup([0.9], [5], [(6, 3)]) == ([0.0], 0.0)
    per_step, per_token = policy._catchup([0.9], [5], [(130, 3)])
    assert per_step == [124.0]  # 1 step left at most
    # one request's 130 tokens: priced near the small forward's (fixed-cost) rate, ~8 us/token
    assert per_token == pytest.approx((0.001 + 2 * (0.032 / 8064)) / 130)
    _, per_token_all = policy._catchup([0.9] * 64, [5] * 64, [(130, 3)] * 64)
    assert per_token_all == pytest.approx(0.033 / 8320)


def test_an_unmeasured_large_catch_up_is_tried() -> None:
    """H100, FP8 draft, a slow host: catch-ups measured 13.1 ms at 129 tokens, 13.8 at 520 and
    21.5 at 1032 (an eager forward's launches, then compute). Carried along the last slope, a
    batch of 64 requests 128 tokens behind (8192 tokens) priced 129 ms and the batch never
    drafted; flat past 1032, the same plan drafts (and the catch-up, once run, is measured)."""
    rids = [(f"r{i}", 5) for i in range(64)]
    policy = warm_policy(64)
    for n, t in ((129, 0.0131), (520, 0.0138), (1032, 0.0215)):
        policy.observe_catchup(n, t)
        policy.observe_catchup(n, t)
    assert policy.catchup(8192) == pytest.approx(0.0215)
    plan = policy.plan(
        rids, num_requests=64, base_tokens=64, max_padded_k=5, draft_lag=[(128, 128)] * 64
    )
    assert all(k > 0 for k in plan.values())


def test_a_request_about_to_finish_does_not_pause_the_next_one() -> None:
    """Batch 1 with 6 ms of host work per speculating step: one draft (all a request with 2
    tokens left may carry) loses, 1.9 tokens per 15 ms against 1 per 8 ms; five drafts win. The
    off plan for the finishing request does not pause speculation, so the request after it
    plans (and drafts) at once instead of after ``pause_replan_interval`` steps."""
    policy = warm_policy(1)
    for _ in range(3):  # (a bucket of H counts from its third observation)
        policy.overhead.observe(1, 0.006)
    assert policy.plan([("old", 1)], num_requests=1, base_tokens=1, max_padded_k=5) == {"old": 0}
    assert not policy.speculation_paused(1)
    assert policy.plan([("new", 5)], num_requests=1, base_tokens=1, max_padded_k=5) == {"new": 5}
    # an off plan for requests that could draft more does pause
    slow = warm_policy(1)
    for _ in range(3):
        slow.overhead.observe(1, 0.030)
    assert slow.plan([("a", 5)], num_requests=1, base_tokens=1, max_padded_k=5) == {"a": 0}
    assert slow.speculation_paused(1)


def test_a_single_inflated_draft_sample_does_not_stop_speculation() -> None:
    """Measured on an H100: the first draft forward of a run took 8.6 ms (1.4 ms after). Acted
    on, it turns batch 1 off, and off, the draft never runs to correct it. A curve with one
    observation is provisional: the plan speculates, the second sample replaces it."""
    policy = AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9))
    for _ in range(2):
        policy.observe_target(1, 0.006)
        policy.observe_target(6, 0.007)
    policy.observe_draft(1, 0.0086)
    assert policy.draft.settled(1) is None
    assert any(policy.plan([("a", 5)], num_requests=1, base_tokens=1, max_padded_k=5).values())
    policy.observe_draft(1, 0.0014)
    assert policy.draft.settled(1) == 0.0014
    assert any(policy.plan([("a", 5)], num_requests=1, base_tokens=1, max_padded_k=5).values())
    # a draft that really is that slow, measured twice, turns it off
    slow = AdaptiveSpecPolicy(5, tracker=AcceptanceTracker(prior=0.9))
    slow.target = policy.target
    for _ in range(3):
        slow.observe_draft(1, 0.0086)
    assert not any(slow.plan([("a", 5)], num_requests=1, base_tokens=1, max_padded_k=5).values())


def test_a_prefill_step_at_an_unmeasured_batch_does_not_pause() -> None:
    """Nothing measured at batch 4 yet: the prefill step drafts nothing and does not pause, so
    the decode steps that follow plan (and explore) instead of running overlapped for
    ``pause_replan_interval`` steps."""
    policy = AdaptiveSpecPolicy(5)
    plan = policy.plan([("a", 5)], num_requests=1, base_tokens=1 + 512, steady_requests=4)
    assert plan == {"a": 0} and policy.stats.prefill_off == 1
    assert not policy.speculation_paused(4)


def test_a_prefill_step_keeps_the_veto_schedule() -> None:
    """A veto at batch 2 schedules its retrial. A prefill step in which those 2 requests decode
    while the batch grows to 8 (nothing realized there yet: it may draft) must not judge the
    veto by its own off rate (its chunk's, far lower): the schedule stays."""
    policy = warm_policy(2)
    # 100 tok/s realized: below decode off (2 per 8 ms), above the prefill step's (2 per 85 ms)
    policy.realized[adaptive_bucket(2)] = deque([(100, 1.0)] * 4, maxlen=16)
    for _ in range(2):  # a prefill step's size measured too (85 ms)
        policy.observe_target(2050, h100_like_target(2050))
    rids = [("a", 5), ("b", 5)]
    assert policy.plan(rids, num_requests=2, base_tokens=2, max_padded_k=5) == {"a": 0, "b": 0}
    assert policy.stats.vetoed == 1
    schedule = dict(policy._retrial_at), dict(policy._retrial_every)
    policy.plan(rids, num_requests=2, base_tokens=2 + 2048, steady_requests=8)
    assert (dict(policy._retrial_at), dict(policy._retrial_every)) == schedule


def test_target_samples_of_the_base_size_postpone_its_refresh_exploration() -> None:
    """After the first exploration at batch 64, a refresh is due every ``refresh_interval``
    plans, counted from the latest T sample of that size (overlapped off steps report them),
    not from the exploration."""
    policy = warm_policy(64)
    policy._explored_at[adaptive_bucket(64)] = 0
    policy._num_plans = 300
    assert policy._explore_due(64)
    policy.observe_target(64, h100_like_target(64))  # an overlapped step, at plan 300
    assert not policy._explore_due(64)
    policy._num_plans = 300 + policy.refresh_interval
    assert policy._explore_due(64)


def test_paused_steps_fade_a_low_rate_so_the_request_drafts_again_after_the_pause() -> None:
    """A batch-1 request whose first drafts were rejected three times (its rate falls to 0.4:
    off, while the replica-wide 0.9 would draft) pauses for ``explore_interval`` steps. Those
    steps drafted nothing, so its evidence fades one step each, as an off plan's does: the first
    pricing after the pause (the engine's dry plan) finds it near the replica-wide rate again,
    and it drafts. (Fading only at plans, the dry plans kept pricing it at 0.4-0.5 and the
    request stayed off for most of a 128-token output: H100, temperature 1, 166 tok/s against
    290 when it drafted.)"""
    policy = AdaptiveSpecPolicy(8, tracker=AcceptanceTracker(prior=0.9), explore_interval=16)
    for n, t in ((1, 0.0059), (1, 0.0059), (9, 0.007), (9, 0.007)):
        policy.observe_target(n, t)
    for _ in range(2):
        policy.observe_draft(1, 0.002)
    cands = [("a", 8)]
    batch = lambda: (cands, [(0, 100)])  # noqa: E731
    for _ in range(3):
        policy.observe_verification("a", 8, 0)
    assert policy.plan(cands, num_requests=1, base_tokens=1) == {"a": 0}
    paused = 0
    while policy.speculation_paused(1, batch):
        policy.skip_plan()
        paused += 1
    assert paused == 16
    assert policy.plan(cands, num_requests=1, base_tokens=1)["a"] > 0


def test_tokens_variance_and_expected_max_normal() -> None:
    assert tokens_variance(0.5, 1) == 0.25  # 0 or 1 accepted, evenly
    assert tokens_variance(1.0, 3) == 0.0  # always all 3
    # 0.9, k = 2: A in {0, 1, 2} with P 0.1, 0.09, 0.81: E[A] 1.71, E[A^2] 3.33
    assert tokens_variance(0.9, 2) == pytest.approx(3.33 - 1.71**2)
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(8) == pytest.approx(1.434, abs=1e-3)
    assert expected_max_normal(64) == pytest.approx(2.337, abs=1e-3)


def test_a_plan_must_also_drain_the_batch_faster_than_off() -> None:
    """Batch 64, H100-like costs: k = 4 at 0.88 yields 1.19x the off rate per step, but the
    last of 64 requests with 128 tokens to go lags the mean by 2.34 standard deviations, about
    5 of 33 steps: the batch drains no faster than off, so no plan. With 2000 tokens to go the
    lag is small against the gain, and at batch 8 the gain is 1.86x: both speculate."""

    def plan(n: int, drain: int):
        def target(x: float) -> float:
            return (0.006 if n == 8 else 0.007) + max(0, x - n) * (1e-5 if n == 8 else 2.34e-5)

        return plan_speculation(
            [0.88] * n,
            [4] * n,
            num_requests=n,
            base_tokens=n,
            target_time=target,
            draft_time=lambda m: 0.0015 if m > 8 else 0.0012,
            min_gain=1.1,
            max_padded_k=4,
            overhead=0.004 if n == 64 else 0.0015,
            drain_tokens=drain,
        )

    assert set(plan(64, 0).num_spec) == {4}  # (no drain term: priced per step, 1.19x)
    assert plan(64, 0).tokens_per_s == pytest.approx(1.186 * plan(64, 0).off_tokens_per_s, 1e-3)
    assert set(plan(64, 128).num_spec) == {0}
    assert set(plan(64, 2000).num_spec) == {4}
    assert set(plan(8, 128).num_spec) == {4}


def test_the_policy_drains_by_the_candidates_tokens_left() -> None:
    """The policy's plans take the drain bound from the draft lags' tokens left."""
    policy = AdaptiveSpecPolicy(4, tracker=AcceptanceTracker(prior=0.88))
    for n, t in ((64, 0.007), (128, 0.0085), (192, 0.010), (256, 0.0115), (320, 0.013)):
        policy.observe_target(n, t)
        policy.observe_target(n, t)
    for _ in range(2):
        policy.observe_draft(64, 0.0015)
    for _ in range(3):  # (a bucket of H counts from its third observation)
        policy.overhead.observe(64, 0.004)
    policy._explored_at[adaptive_bucket(64)] = 0
    cands = [(f"q{i}", 4) for i in range(64)]
    kw = {"num_requests": 64, "base_tokens": 64, "max_padded_k": 4}
    assert set(policy.plan(cands, draft_lag=[(2, 2000)] * 64, **kw).values()) == {4}
    assert set(policy.plan(cands, draft_lag=[(2, 128)] * 64, **kw).values()) == {0}
