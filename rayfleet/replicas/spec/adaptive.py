"""How many drafts each request proposes next step. Pure Python (no torch): unit-tested with
hand-fed timings.

Two decisions, made together each step by ``plan_speculation``:

- per request, from its observed acceptance rate a (an exponentially decayed count, pulled toward
  the replica-wide rate; planned on a 1/RATE_GRID grid): with k drafts and i.i.d. acceptance a,
  a step yields on average E(k) = 1 + a + a^2 + ... + a^k tokens; draft j is worth a^j expected
  tokens.
- per step, from a measured cost model: the target forward's time as a function of the step's
  tokens, T(n), and one draft forward's time as a function of its tokens, D(n) (a proposal's
  forwards after the first carry one token per drafting request). A plan {k_i} costs
  T(n_base + sum k_i) + max_i(k_i) * D(#{k_i > 0}) and yields
  sum_i E_i(k_i) + (requests not speculating) tokens. Plans considered: for each threshold theta
  in THRESHOLDS, k_i = the drafts of request i worth >= theta each (a_i^j >= theta), capped. The
  plan with the best tokens/second wins, and only if it beats speculation off,
  n_req / T(n_base), by ``min_gain``; otherwise every k is 0 and the draft does not run at all.

The cost curves are learnt online by the runner (``observe_target`` / ``observe_draft``). When the
non-speculative point T(n_base) has never been measured near n_base, the controller takes a
speculation-off step to measure it (at most once per ``explore_interval`` plans per bucket), so it
can never keep speculating on a guess: a bucket with fewer than ``min_samples`` observations is
measured every ``explore_interval`` plans, and every bucket again every ``refresh_interval`` plans.
Symmetrically, after ``probe_interval`` consecutive plans with speculation off, one step
speculates (the UNMEASURED_THRESHOLD plan) so a stale or unlucky draft measurement cannot keep
it off for good.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

THRESHOLDS: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
# Before anything is measured: draft what is worth at least this much, and so get measured.
UNMEASURED_THRESHOLD = 0.3
# Rates are planned on a 1/40 grid, so a step's plan costs O(requests + distinct rates).
RATE_GRID = 40


def _bucket(n: int) -> int:
    """Half-octave buckets: 1, 2, 3, 4-5, 6-7, 8-11, ... share a key."""
    return round(2 * math.log2(max(n, 1)))


class CostCurve:
    """Seconds as a function of a size, from observations: per half-octave bucket an average of
    (size, seconds) (exponentially weighted, ``ema`` for new samples), linear interpolation between
    buckets, flat below the smallest size seen (small steps are launch/memory bound) and
    proportional above the largest (large steps are compute bound).

    A bucket's first sample is provisional: the second replaces it, since a shape's first run
    often pays one-off costs (kernel compilation, autotuning, allocator growth)."""

    def __init__(self, ema: float = 0.25) -> None:
        self.ema = ema
        self._points: dict[int, tuple[float, float]] = {}  # bucket -> (mean size, mean seconds)
        self._counts: dict[int, int] = {}
        self._sorted: list[tuple[float, float]] | None = None  # points by size, rebuilt lazily

    def observe(self, size: int, seconds: float) -> None:
        if size <= 0 or seconds <= 0:
            return
        b = _bucket(size)
        old = self._points.get(b)
        if old is None or self._counts[b] == 1:
            self._points[b] = (float(size), seconds)
        else:
            w = self.ema
            self._points[b] = ((1 - w) * old[0] + w * size, (1 - w) * old[1] + w * seconds)
        self._counts[b] = self._counts.get(b, 0) + 1
        self._sorted = None

    def count_near(self, size: int) -> int:
        """Observations in ``size``'s bucket."""
        return self._counts.get(_bucket(size), 0)

    def __bool__(self) -> bool:
        return bool(self._points)

    def __call__(self, size: float) -> float | None:
        if not self._points:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._points.values())
        pts = self._sorted
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1] * size / pts[-1][0]
        i = bisect.bisect_left(pts, (size, -math.inf))  # pts[i - 1][0] < size <= pts[i][0]
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (size - x0) / (x1 - x0)


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens a step yields with k drafts accepted i.i.d. with probability ``rate``:
    the accepted run plus the one correction/bonus token, sum_{j=0..k} rate^j."""
    return sum(rate**j for j in range(k + 1))


def drafts_worth(rate: float, threshold: float, cap: int) -> int:
    """Largest k <= cap with rate^k >= threshold (each of the k drafts worth >= threshold)."""
    if cap <= 0 or rate <= 0.0:
        return 0
    if rate >= 1.0:
        return cap
    k = math.floor(math.log(threshold) / math.log(rate) + 1e-9)
    return max(0, min(cap, k))


@dataclass
class Plan:
    num_spec: list[int]  # per candidate request
    tokens_per_s: float  # predicted, of the chosen plan
    off_tokens_per_s: float  # predicted with speculation off


def plan_speculation(
    rates: Sequence[float],
    caps: Sequence[int],
    *,
    num_requests: int,
    base_tokens: int,
    target_time: Callable[[float], float | None],
    draft_time: Callable[[float], float | None],
    min_gain: float = 1.02,
) -> Plan:
    """Choose drafts per candidate request (``rates``/``caps`` aligned); see the module docstring.

    ``num_requests`` requests sample next step (candidates included), ``base_tokens`` is the step's
    token count without drafts. Unknown costs: with no target measurement at all the plan is the
    UNMEASURED_THRESHOLD one (the step speculates and so gets measured); an unmeasured draft
    counts as free.
    """
    # Requests with the same (rate on the grid, cap) get the same k: plan per group.
    keys = [(round(r * RATE_GRID) / RATE_GRID, c) for r, c in zip(rates, caps)]
    groups: dict[tuple[float, int], int] = {}
    for key in keys:
        groups[key] = groups.get(key, 0) + 1
    t_off = target_time(base_tokens)
    if t_off is None:
        chosen = {g: drafts_worth(g[0], UNMEASURED_THRESHOLD, g[1]) for g in groups}
        return Plan([chosen[key] for key in keys], tokens_per_s=math.inf, off_tokens_per_s=0.0)
    off = num_requests / t_off
    best: dict[tuple[float, int], int] | None = None
    best_rate = off
    seen: set[tuple[int, ...]] = set()
    for theta in THRESHOLDS:
        ks = {g: drafts_worth(g[0], theta, g[1]) for g in groups}
        sig = tuple(ks.values())
        if sig in seen or not any(sig):
            continue
        seen.add(sig)
        extra = sum(n * (expected_tokens(g[0], ks[g]) - 1.0) for g, n in groups.items())
        num_drafts = sum(n * ks[g] for g, n in groups.items())
        num_drafting = sum(n for g, n in groups.items() if ks[g])
        t_target = target_time(base_tokens + num_drafts) or 0.0
        t_draft = draft_time(num_drafting) or 0.0
        rate = (num_requests + extra) / (t_target + max(sig) * t_draft)
        if rate > best_rate and rate > off * min_gain:
            best, best_rate = ks, rate
    if best is None:
        return Plan([0] * len(keys), tokens_per_s=off, off_tokens_per_s=off)
    return Plan([best[key] for key in keys], tokens_per_s=best_rate, off_tokens_per_s=off)


class AcceptanceTracker:
    """Per-request acceptance rate: decayed counts of (accepted, tried) drafts, with a prior of
    ``prior_weight`` tries at the replica-wide rate. A draft position counts as tried when every
    draft before it was accepted (the verifier never looks past the first rejection)."""

    def __init__(self, prior: float = 0.6, prior_weight: float = 2.0, decay: float = 0.8) -> None:
        self.prior_weight = prior_weight
        self.decay = decay
        self.global_accepted = prior * 10.0
        self.global_tried = 10.0
        self._counts: dict[str, list[float]] = {}

    @property
    def global_rate(self) -> float:
        return self.global_accepted / self.global_tried

    def rate(self, request_id: str) -> float:
        acc, tried = self._counts.get(request_id, (0.0, 0.0))
        w = self.prior_weight
        return (acc + w * self.global_rate) / (tried + w)

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        tried = min(accepted + 1, drafted)
        c = self._counts.setdefault(request_id, [0.0, 0.0])
        c[0] = self.decay * c[0] + accepted
        c[1] = self.decay * c[1] + tried
        self.global_accepted = 0.99 * self.global_accepted + accepted
        self.global_tried = 0.99 * self.global_tried + tried

    def idle(self, request_id: str) -> None:
        """A step the request did not draft: its evidence fades toward the prior, so a request
        switched off for low acceptance is retried after a few steps."""
        c = self._counts.get(request_id)
        if c is not None:
            c[0] *= self.decay
            c[1] *= self.decay

    def forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)


class SpecPolicy(Protocol):
    """What the runner asks each step. ``candidates`` are (request_id, most drafts allowed)."""

    def plan(
        self, candidates: Sequence[tuple[str, int]], *, num_requests: int, base_tokens: int
    ) -> dict[str, int]: ...

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None: ...

    def observe_target(self, num_tokens: int, seconds: float) -> None: ...

    def observe_draft(self, num_tokens: int, seconds: float) -> None: ...

    def forget(self, request_id: str) -> None: ...


class FixedSpecPolicy:
    """Always ``k`` drafts (per request via ``per_request``, default ``k``), capped. For tests and
    for measuring acceptance at a fixed k."""

    def __init__(self, k: int, per_request: dict[str, int] | None = None) -> None:
        self.k = k
        self.per_request = dict(per_request or {})

    def plan(
        self, candidates: Sequence[tuple[str, int]], *, num_requests: int, base_tokens: int
    ) -> dict[str, int]:
        return {rid: min(cap, self.per_request.get(rid, self.k)) for rid, cap in candidates}

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        pass

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass


class AdaptiveSpecPolicy:
    """Acceptance-driven per-request k and cost-model-driven step decision (module docstring)."""

    def __init__(
        self,
        max_k: int,
        *,
        tracker: AcceptanceTracker | None = None,
        min_gain: float = 1.02,
        min_samples: int = 3,
        explore_interval: int = 8,
        refresh_interval: int = 256,
        probe_interval: int = 64,
    ) -> None:
        self.max_k = max_k
        self.tracker = tracker or AcceptanceTracker()
        self.target = CostCurve()
        self.draft = CostCurve()
        self.min_gain = min_gain
        self.min_samples = min_samples
        self.explore_interval = explore_interval
        self.refresh_interval = refresh_interval
        self.probe_interval = probe_interval
        self._off_streak = 0
        self._num_plans = 0
        self._explored_at: dict[int, int] = {}  # base-tokens bucket -> plan number
        self.last_plan: Plan | None = None

    def plan(
        self, candidates: Sequence[tuple[str, int]], *, num_requests: int, base_tokens: int
    ) -> dict[str, int]:
        self._num_plans += 1
        if not candidates:
            return {}
        if self.target and self._explore_due(base_tokens):
            # Measure speculation off at this batch before trusting an extrapolation.
            self._explored_at[_bucket(base_tokens)] = self._num_plans
            self.last_plan = None
            return {rid: 0 for rid, _ in candidates}
        rates = [self.tracker.rate(rid) for rid, _ in candidates]
        caps = [min(cap, self.max_k) for _, cap in candidates]
        plan = plan_speculation(
            rates,
            caps,
            num_requests=num_requests,
            base_tokens=base_tokens,
            target_time=self.target,
            draft_time=self.draft,
            min_gain=self.min_gain,
        )
        if any(plan.num_spec):
            self._off_streak = 0
        else:
            self._off_streak += 1
            if self._off_streak >= self.probe_interval:
                # Re-measure the speculative side once.
                self._off_streak = 0
                plan = Plan(
                    [drafts_worth(r, UNMEASURED_THRESHOLD, c) for r, c in zip(rates, caps)],
                    tokens_per_s=math.nan,
                    off_tokens_per_s=plan.off_tokens_per_s,
                )
        self.last_plan = plan
        step_on = any(plan.num_spec)
        for (rid, _), k in zip(candidates, plan.num_spec):
            if step_on and k == 0:
                self.tracker.idle(rid)
        return {rid: k for (rid, _), k in zip(candidates, plan.num_spec)}

    def _explore_due(self, base_tokens: int) -> bool:
        last = self._explored_at.get(_bucket(base_tokens))
        if last is None:
            return self.target.count_near(base_tokens) == 0
        since = self._num_plans - last
        if self.target.count_near(base_tokens) < self.min_samples:
            return since >= self.explore_interval
        return since >= self.refresh_interval

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        self.tracker.observe(request_id, drafted, accepted)

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        self.target.observe(num_tokens, seconds)

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        self.draft.observe(num_tokens, seconds)

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
