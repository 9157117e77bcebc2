"""How many drafts each request proposes next step. Pure Python (no torch): unit-tested with
hand-fed timings.

Two decisions, made together each step by ``plan_speculation``:

- per request, from its observed acceptance rate a (an exponentially decayed count, pulled toward
  the replica-wide rate; planned on a 1/RATE_GRID grid): with k drafts and i.i.d. acceptance a,
  a step yields on average E(k) = 1 + a + a^2 + ... + a^k tokens; draft j is worth a^j expected
  tokens.
- per step, from a measured cost model: the target step's time as a function of its tokens,
  T(n), and the draft's time per forward as a function of the requests drafting, D(m) (a
  proposal's forwards after the first carry one token per drafting request). A plan {k_i} costs
  T(n_verify) + max_i(k_i) * D(#{k_i > 0}) + H(n_req) and yields sum_i E_i(k_i) + (requests not
  speculating) tokens, where n_verify = n_base + sum k_i, or, when the verification step will
  replay a CUDA graph (k <= ``max_padded_k``), n_base + n_req * max_i(k_i): every request is
  padded to the longest query. Plans considered: for each threshold theta in THRESHOLDS, k_i =
  the drafts of request i worth >= theta each (a_i^j >= theta), capped; and with graphs, for each
  k and theta, k drafts for every request whose first draft is worth >= theta (padding makes
  the others' drafts free on the target side). The plan with the best tokens/second wins, and
  only if it beats speculation off, n_req / T(n_base), by ``min_gain``; otherwise every k is 0
  and the draft does not run at all.

H(n_req) is the host work a speculating step adds (module section "Sync overhead"); a
speculation-off step overlaps its host work with the device and costs T(n_base).

The cost curves are learnt online by the runner (``observe_target`` / ``observe_draft``) from
steady-state steps only: target steps of decode/verification shape (no prefill chunk), timed on
the device from the step's first kernel to its sampled ids on CUDA (a speculation-off step
overlaps its input building with the previous step, so its device time is what it costs; timed
from input building elsewhere; the overlapped steps of paused speculation are timed too, on CUDA
read when their tokens arrive, so T(n_base) stays fresh and a measured bucket needs no
synchronous exploration), and proposals whose first forward was not a catch-up prefill.
Each curve keeps a window of recent samples per size bucket (its median: one slow outlier does
not switch speculation off).

Exploration. Speculation-off throughput T(n_base) must be measured near n_base before any plan
trusts it: the controller takes a speculation-off step when that bucket was never measured, then
every ``refresh_interval`` plans (these are cheap: one ordinary decode step). The speculative side
is explored by optimism: above the largest size measured, T is extrapolated along its last
segment (flat from a single point), so an unmeasured verification size looks cheap and gets
tried; such a plan runs for the ``explore_requests`` best-accepting requests only (with a padded
verification graph the step still costs its full size, which is what gets measured, while the
draft's catch-up prefill stays small). After ``probe_interval`` consecutive plans with
speculation off at a batch bucket, one step speculates likewise for a few requests, two drafts
each (a cheap padded verification, and one single-token draft forward to time), so stale
measurements cannot keep it off for good; each probe that does not turn speculation back on
doubles the interval at its batch bucket (up to ``max_probe_interval``), and only a measured
win at that bucket restarts it (a win at batch 8 says nothing of batch 256). The first
interval grows with the batch, ``probe_interval`` x n / ``probe_batch``: a probe costs a
synchronous step, the drained step in flight, a padded verification and a catch-up, 2-3% of a
128-step run at batch 64 or 256 on the H100, while what speculation can gain there (a
verification that is compute-bound) is small.

Sync overhead. T and D time the forwards, not the step: a speculating step runs synchronously
(planning reads the sampled tokens), so scheduling, input building, rejection sampling and
output processing add to it, while a speculation-off step overlaps them with the device. The
engine reports each steady-state step's wall time (``observe_step``); for a step between two
speculating plans (it verifies one plan's drafts and proposes the next's) the policy records
H = wall - T(n_verify) of the one - k * D(m) of the other, in a third curve over the batch
size (the buckets and interpolation of T and D; each bucket's lower quartile, since a stall adds
milliseconds to a sub-millisecond sample; flat past the largest batch measured). The host work
done while the draft runs (output processing, scheduling and input staging of the next
verification, which reads the drafts from the device: spec/proposer.py) is hidden behind the
drafts and so absent from H; what H holds is the host work between the verification and the
first draft forward. A step whose wall holds a draft catch-up (reported with the proposal's ids,
in the step that waited for them) gives no sample. A step whose proposal was chained behind its
verification on the device (ModelRunner._chain: greedy batches a whole-proposal graph covers)
has next to no host work there: its samples go to a curve of their own, which prices the plans
made for chaining (a batch of sampled requests proposes after the result and keeps the first
curve's H); a dry verdict, which cannot tell how the steps it prices would propose, takes the
larger of the two. Host work does not depend on the acceptance
rate, so the curve stays valid when acceptance moves; until a bucket is measured the curve
interpolates between the batch sizes that were and stays flat past the largest (0 before any):
an unmeasured large batch is priced at the largest measured H, tried, and vetoed by its realized
rate if that was too little.

Realized rates. The cost model can misprice (acceptance that is not i.i.d. across positions,
host work that varies, curves learnt at other contexts), so what speculation really delivers is
checked: for each step between two full speculating plans the engine reports the tokens it
emitted, and the policy keeps, per batch bucket, the recent such steps' tokens and wall seconds.
When at least ``min_realized`` of them are in and their rate (tokens over seconds, summed: a
batch-1 step yields 1 to k + 1 tokens, so single steps are noisy) falls below
``realized_min_gain`` x the speculation-off rate n / T(n), a full plan at that bucket is vetoed
(speculation off). The margin (5%) is above what the per-step rate can show: speculation makes
a batch's requests finish at scattered steps, and the ragged tail they leave runs at small
batches (H100, batch 64 at temperature 1: steps 3% faster than off, the run 2.5% slower).
The veto is revisited by dropping that bucket's samples after ``probe_interval`` plans, then
after twice as many each time it is confirmed (up to ``max_probe_interval``); a retrial costs
the few speculating steps that re-measure it.

Draining. Requests of a batch progress at random speeds under speculation (each step yields 1 to
k + 1 tokens) and at one token a step without it, so speculation scatters the steps at which
they finish: the batch's last request, the one that decides when a closed batch (no requests
waiting to replace finished ones) is done, lags the mean. With L the most tokens a candidate may
still generate, E and Var the mean and variance of a step's tokens at the candidates' mean rate,
a plan's batch drains in about L / E + z_n sqrt(L Var / E^3) steps of its cost (z_n the expected
maximum of n standard normals, 2.3 at n = 64), against L speculation-off steps; a plan must win
that comparison by ``min_gain`` too. On the H100 a greedy batch of 64 gained 1.24x per step and
lost 2-8% over its 128-token run; at batch 8 or with long outputs the term is small, at batch 1
it is 0.

Draft catch-up. While speculation is off for a request its draft KV falls behind; the first
proposal after that feeds the draft every verified token since (a prefill). A plan pays for its
drafting requests' catch-up, spread over the steps each has left (tokens left over expected
tokens per step, at most ``catchup_horizon``), at the seconds per token of a catch-up forward
of that size (a fourth curve, over the tokens a catch-up feeds: ``observe_catchup``; flat past
the largest size measured, like H: a catch-up larger than any seen is tried, then measured): a
request 130 tokens behind with 3 tokens to go is not worth drafting for; one with 500 to go is.

Prefill steps. A step that carries prefill chunks cannot be measured (its cost is the chunks'),
and drafting in it also feeds the chunks to the draft. It speculates only if a decode step of the
batch it is growing into (requests running or waiting, ``steady_requests``) would: a full plan
there, with that batch's measured T and not vetoed. A burst of 256 arrivals then drafts nothing
while its prefills run, instead of drafting for the first requests to finish their prompts.

Pausing. Planning needs the previous step's sampled tokens, so an engine that overlaps scheduling
with the device (one step in flight) can only plan on synchronous steps. ``speculation_paused``
says, before a step is scheduled, whether it may skip planning and run overlapped: the last plan
drafted nothing for a batch of about this size (same half-octave bucket) while some candidate
could still draft ``max_k`` (a plan off only because every request is about to finish would
otherwise keep the next request at that batch size from speculating), it was made fewer than
``pause_replan_interval`` steps ago (acceptance rates, costs and the batch's composition may have
moved: re-plan now and then; ``explore_interval`` steps when the plan was off only for the
requests' own low acceptance, which fades back toward the replica-wide rate step by step, the
paused steps included: the next pricing, dry or real, fades it for each step paused since),
and the next plan would not be a probe (a due probe waits while the steps carry prompt chunks:
it runs only in a decode step). A speculation-off exploration
(one step measuring T(n_base)) does not pause. Each skipped plan (``skip_plan``) counts as a
speculation-off plan at its batch bucket for the probe and exploration schedules, so probes and
refreshes come due as they would with a plan every step.

Dry plans. Outside the paused bucket (requests finish at staggered steps, a burst arrives, the
last plan was an exploration) a synchronous step just to plan costs H(n) and the drained step
in flight: about 5 ms a step at 200 requests on the H100, 30 ms for an 8k-token prefill step
whose inputs are no longer built under the previous step. Instead the engine hands over the
requests the step would plan for (``batch``: candidates and draft lags from the host's view,
tokens in flight counted as generated; requests not yet held by the runner are priced at the
replica-wide rate with full caps) and the policy prices a decode step of that batch as it
prices a prefill step's batch (measured T there, realized veto, catch-up). If that dry plan is
off and no exploration is due, the step runs overlapped (``PolicyStats.dry_off``), and the
bucket becomes the paused one unless every request is near its end (then the next step prices
again). No request may hold drafts (the engine checks): those must be verified in a
synchronous step.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Protocol

THRESHOLDS: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
# Before anything is measured: draft what is worth at least this much, and so get measured.
UNMEASURED_THRESHOLD = 0.3
# Rates are planned on a 1/40 grid, so a step's plan costs O(requests + distinct rates).
RATE_GRID = 40

# The requests a step would plan for, read lazily: (candidates (request id, most drafts),
# draft lags (tokens the draft is behind, tokens left)), aligned.
DryBatch = Callable[[], tuple[Sequence[tuple[str, int]], Sequence[tuple[int, int]]]]


def _bucket(n: int) -> int:
    """Half-octave buckets: 1, 2, 3, 4-5, 6-7, 8-11, ... share a key."""
    return round(2 * math.log2(max(n, 1)))


class CostCurve:
    """Seconds as a function of a size, from observations: per half-octave bucket the recent
    samples (the last ``window``; point = (mean size, the ``quantile`` of the seconds, by default
    the lower median)), linear interpolation between buckets, flat below the smallest size seen
    (small steps are launch/memory bound), and above the largest along the slope of the last
    segment (never decreasing; flat when only one bucket is known), so that a size never measured
    looks no more expensive than the largest one plus its trend.

    A bucket's first sample is provisional: the second replaces it, since a shape's first run
    often pays one-off costs (kernel compilation, autotuning, allocator growth).

    ``extrapolate=False``: flat above the largest size too (the sync overhead H, whose samples
    at small batches are near 0 and noisy: a slope between two of them, carried to batch 64,
    priced speculation out of batches it wins at; a flat H lets that batch be measured, and
    realized rates veto a loss).

    ``quantile``: which order statistic of a bucket's samples stands for it, index
    ``floor((count - 1) * quantile)`` of the sorted seconds (0.5: the lower median; 0: the
    minimum).

    ``min_count``: a bucket stands for nothing until it holds this many observations (its
    provisional one included); a curve with no such bucket reads None."""

    def __init__(
        self,
        window: int = 8,
        *,
        extrapolate: bool = True,
        quantile: float = 0.5,
        min_count: int = 1,
    ) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.window = window
        self.extrapolate = extrapolate
        self.quantile = quantile
        self.min_count = min_count
        self._samples: dict[int, deque[tuple[int, float]]] = {}
        self._counts: dict[int, int] = {}
        self._sorted: list[tuple[float, float]] | None = None  # points by size, rebuilt lazily

    def observe(self, size: int, seconds: float) -> None:
        if size <= 0 or seconds <= 0:
            return
        b = _bucket(size)
        samples = self._samples.setdefault(b, deque(maxlen=self.window))
        if self._counts.get(b, 0) == 1:
            samples.clear()
        samples.append((size, seconds))
        self._counts[b] = self._counts.get(b, 0) + 1
        self._sorted = None

    def settled(self, size: float) -> float | None:
        """``self(size)``, or None while the curve holds a single observation: that one is
        provisional, and a policy that acted on an inflated first draft, overhead or catch-up
        sample would stop speculating and so never take the second. (Curve-wide: a first sample
        at a new size, once others are in, is trusted.)"""
        return self(size) if sum(self._counts.values()) >= 2 else None

    def count_near(self, size: int) -> int:
        """Observations in ``size``'s bucket."""
        return self._counts.get(_bucket(size), 0)

    def __bool__(self) -> bool:
        return bool(self._samples)

    def points(self) -> list[tuple[float, float]]:
        """(mean size, the ``quantile`` of its seconds) per bucket, by size. Timing noise only
        adds time (a late host, interference, a compile), so an order statistic rounded down: at
        the default 0.5, of an even count the smaller middle sample (with two, their mean would
        let one outlier set the bucket: a 12 ms step beside a 1 ms one priced H at 6.5 ms for
        batch 8 on the H100 and kept speculation off at 0.95x)."""
        if self._sorted is None:
            pts = []
            for b, samples in self._samples.items():
                if self._counts.get(b, 0) < self.min_count:
                    continue
                secs = sorted(t for _, t in samples)
                at = int((len(secs) - 1) * self.quantile)
                pts.append((sum(n for n, _ in samples) / len(samples), secs[at]))
            self._sorted = sorted(pts)
        return self._sorted

    def __call__(self, size: float) -> float | None:
        pts = self.points()
        if not pts:
            return None
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            if len(pts) == 1 or not self.extrapolate:
                return pts[-1][1]
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            return y1 + max(y1 - y0, 0.0) / (x1 - x0) * (size - x1)
        i = bisect.bisect_left(pts, (size, -math.inf))  # pts[i - 1][0] < size <= pts[i][0]
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (size - x0) / (x1 - x0)


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens a step yields with k drafts accepted i.i.d. with probability ``rate``:
    the accepted run plus the one correction/bonus token, sum_{j=0..k} rate^j."""
    return sum(rate**j for j in range(k + 1))


def tokens_variance(rate: float, k: int) -> float:
    """Variance of the tokens a step yields with k drafts accepted i.i.d. at ``rate``: with A
    the accepted run, P(A >= j) = rate^j (j <= k), so E[A^2] = sum_j (2j - 1) rate^j."""
    mean = sum(rate**j for j in range(1, k + 1))
    return sum((2 * j - 1) * rate**j for j in range(1, k + 1)) - mean * mean


def expected_max_normal(n: int) -> float:
    """E[max of n standard normals] (Blom's approximation; 0 for one)."""
    if n <= 1:
        return 0.0
    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


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
    # Predicted seconds of the chosen speculating plan's verification, T(n_verify), and of its
    # proposal, k * D(m) (the sync overhead left out); 0 when it speculates nothing.
    verify_s: float = 0.0
    draft_s: float = 0.0


def plan_speculation(
    rates: Sequence[float],
    caps: Sequence[int],
    *,
    num_requests: int,
    base_tokens: int,
    target_time: Callable[[float], float | None],
    draft_time: Callable[[float], float | None],
    min_gain: float = 1.02,
    max_padded_k: int = 0,
    overhead: float = 0.0,
    catchup: Sequence[float] | None = None,
    catchup_s_per_token: float = 0.0,
    drain_tokens: int = 0,
) -> Plan:
    """Choose drafts per candidate request (``rates``/``caps`` aligned); see the module docstring.

    ``num_requests`` requests sample next step (candidates included), ``base_tokens`` is the step's
    token count without drafts. A plan whose longest draft run is at most ``max_padded_k`` is
    verified by a padded CUDA graph (num_requests * (1 + k) tokens). ``overhead``: seconds of
    host work every speculating plan adds (H). ``catchup`` (aligned with ``rates``): draft
    tokens each request must catch up on before it can propose, per step of the horizon they
    are spread over; a plan pays ``catchup_s_per_token`` for those of its drafting requests.
    ``drain_tokens``: the most tokens a candidate may still generate (0: unknown); with it a
    plan must also drain the batch ``min_gain`` faster than speculation off (module docstring,
    "Draining"). Unknown costs: with no
    target measurement at all the plan is the UNMEASURED_THRESHOLD one (the step speculates and
    so gets measured); an unmeasured draft counts as free.
    """
    # Requests with the same (rate on the grid, cap) get the same k: plan per group.
    keys = [(round(r * RATE_GRID) / RATE_GRID, c) for r, c in zip(rates, caps)]
    groups: dict[tuple[float, int], int] = {}
    group_catchup: dict[tuple[float, int], float] = {}
    for i, key in enumerate(keys):
        groups[key] = groups.get(key, 0) + 1
        if catchup is not None:
            group_catchup[key] = group_catchup.get(key, 0.0) + catchup[i]
    t_off = target_time(base_tokens)
    if t_off is None:
        chosen = {g: drafts_worth(g[0], UNMEASURED_THRESHOLD, g[1]) for g in groups}
        return Plan([chosen[key] for key in keys], tokens_per_s=math.inf, off_tokens_per_s=0.0)
    off = num_requests / t_off
    floor = off * min_gain  # a plan must beat this (and every plan before it)
    gkeys = list(groups)
    sizes = [groups[g] for g in gkeys]
    catch = [group_catchup.get(g, 0.0) * catchup_s_per_token for g in gkeys]
    # tokens[i][k]: expected tokens per request of group i with k drafts (k <= its cap).
    tokens = [list(itertools.accumulate(rate**j for j in range(cap + 1))) for rate, cap in gkeys]
    best: list[int] | None = None
    best_rate = off
    best_times = (0.0, 0.0)
    seen: set[tuple[int, ...]] = set()
    z = expected_max_normal(num_requests)
    mean_rate = sum(n * g[0] for n, g in zip(sizes, gkeys)) / sum(sizes)
    # Per plan: the draft's time by drafting requests, and the drain bound's steps by k.
    draft_s: dict[int, float] = {}
    drain_steps: dict[int, float] = {}

    def price(ks: list[int], verify_tokens: int, t_target: float | None = None) -> None:
        nonlocal best, best_rate, best_times
        sig = tuple(ks)
        if sig in seen:
            return
        seen.add(sig)
        extra = sum(n * (t[k] - 1.0) for n, t, k in zip(sizes, tokens, ks))
        num_drafting = sum(n for n, k in zip(sizes, ks) if k)
        if t_target is None:
            t_target = target_time(verify_tokens) or 0.0
        t_draft = draft_s.get(num_drafting)
        if t_draft is None:
            t_draft = draft_s[num_drafting] = draft_time(num_drafting) or 0.0
        t_catchup = sum(c for c, k in zip(catch, ks) if k)
        t_step = t_target + max(ks) * t_draft + overhead + t_catchup
        if drain_tokens > 0 and z > 0.0:
            k = max(ks)
            steps = drain_steps.get(k)
            if steps is None:
                e = expected_tokens(mean_rate, k)
                steps = drain_steps[k] = drain_tokens / e + z * math.sqrt(
                    drain_tokens * tokens_variance(mean_rate, k) / e**3
                )
            if steps * t_step * min_gain > drain_tokens * t_off:
                return  # the batch's last request would finish later than with speculation off
        rate = (num_requests + extra) / t_step
        if rate > best_rate and rate > floor:
            best, best_rate, best_times = ks, rate, (t_target, max(ks) * t_draft)

    # Unpadded: for each threshold theta, the drafts worth >= theta each (kept where they need
    # more than the graphs' max_padded_k drafts).
    for theta in THRESHOLDS:
        ks = [drafts_worth(rate, theta, cap) for rate, cap in gkeys]
        if max(ks) > max_padded_k:
            price(ks, base_tokens + sum(n * k for n, k in zip(sizes, ks)))
    # Padded (a verification graph): the target computes k + 1 rows per request whatever each
    # drafts, so for each k and theta, k drafts (capped) for every request whose first draft is
    # worth >= theta. A k whose target time alone loses with every request drafting is skipped.
    # (which groups join, per threshold; distinct and non-empty ones only)
    joins = [
        j
        for j in dict.fromkeys(
            tuple(drafts_worth(rate, theta, 1) > 0 for rate, _ in gkeys) for theta in THRESHOLDS
        )
        if any(j)
    ]
    for k in range(1, max_padded_k + 1):
        verify_tokens = base_tokens + num_requests * k
        t_target = target_time(verify_tokens) or 0.0
        upper = sum(n * (t[min(k, len(t) - 1)] - 1.0) for n, t in zip(sizes, tokens))
        if t_target > 0 and (num_requests + upper) / (t_target + overhead) <= max(best_rate, floor):
            continue
        for join in joins:
            ks = [min(cap, k) if j else 0 for (_, cap), j in zip(gkeys, join)]
            if any(ks):
                price(ks, verify_tokens, t_target)
    if best is None:
        return Plan([0] * len(keys), tokens_per_s=off, off_tokens_per_s=off)
    chosen = dict(zip(gkeys, best))
    return Plan(
        [chosen[key] for key in keys],
        tokens_per_s=best_rate,
        off_tokens_per_s=off,
        verify_s=best_times[0],
        draft_s=best_times[1],
    )


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

    def idle(self, request_id: str, steps: int = 1) -> None:
        """``steps`` steps the request did not draft: its evidence fades toward the prior, so a
        request switched off for low acceptance is retried after a few steps."""
        c = self._counts.get(request_id)
        if c is not None and steps > 0:
            f = self.decay**steps
            c[0] *= f
            c[1] *= f

    def forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)


class SpecPolicy(Protocol):
    """What the runner asks each step. ``candidates`` are (request_id, most drafts allowed);
    ``max_padded_k``: verification steps with at most this many drafts per request replay a
    padded CUDA graph (0: none). ``steady_requests`` is given for a step with prefill chunks:
    the batch it is growing into (``steady_padded_k``: that batch's max_padded_k).
    ``draft_lag`` (aligned with ``candidates``): (verified tokens the draft has not run over,
    tokens the request may still generate). ``chained``: the plan's proposal will be queued
    behind the step's verification on the device (ModelRunner._chain), so the host adds
    almost nothing between them."""

    def plan(
        self,
        candidates: Sequence[tuple[str, int]],
        *,
        num_requests: int,
        base_tokens: int,
        max_padded_k: int = 0,
        steady_requests: int | None = None,
        steady_padded_k: int = 0,
        draft_lag: Sequence[tuple[int, int]] | None = None,
        chained: bool = False,
    ) -> dict[str, int]: ...

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None: ...

    def observe_target(self, num_tokens: int, seconds: float) -> None: ...

    def observe_draft(self, num_tokens: int, seconds: float) -> None: ...

    def observe_catchup(self, num_tokens: int, seconds: float) -> None:
        """A draft forward that caught up on ``num_tokens`` tokens took ``seconds``."""
        ...

    def observe_step(self, num_requests: int, seconds: float, num_tokens: int = 0) -> None:
        """A steady-state engine step (no prefill) of ``num_requests`` requests took ``seconds``
        of wall time and emitted ``num_tokens`` tokens; called after the step's plan /
        skip_plan."""
        ...

    def forget(self, request_id: str) -> None: ...

    def speculation_paused(
        self,
        num_requests: int,
        batch: DryBatch | None = None,
        padded_k: int = 0,
        prefill: bool = False,
    ) -> bool:
        """The next step (about ``num_requests`` requests) may skip planning: no drafts.
        ``batch``, when given, returns the candidates and draft lags (as ``plan`` takes them) of
        the requests the step would plan for; ``padded_k`` is a decode step's ``max_padded_k``;
        ``prefill``: the step will carry prompt chunks."""
        ...

    def skip_plan(self) -> None:
        """A step ran without planning (``speculation_paused`` said so)."""
        ...


class FixedSpecPolicy:
    """Always ``k`` drafts (per request via ``per_request``, default ``k``), capped. For tests and
    for measuring acceptance at a fixed k."""

    def __init__(self, k: int, per_request: dict[str, int] | None = None) -> None:
        self.k = k
        self.per_request = dict(per_request or {})

    def plan(
        self,
        candidates: Sequence[tuple[str, int]],
        *,
        num_requests: int,
        base_tokens: int,
        max_padded_k: int = 0,
        steady_requests: int | None = None,
        steady_padded_k: int = 0,
        draft_lag: Sequence[tuple[int, int]] | None = None,
        chained: bool = False,
    ) -> dict[str, int]:
        return {rid: min(cap, self.per_request.get(rid, self.k)) for rid, cap in candidates}

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        pass

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_catchup(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_step(self, num_requests: int, seconds: float, num_tokens: int = 0) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass

    def speculation_paused(
        self,
        num_requests: int,
        batch: DryBatch | None = None,
        padded_k: int = 0,
        prefill: bool = False,
    ) -> bool:
        return self.k == 0 and not any(self.per_request.values())

    def skip_plan(self) -> None:
        pass


@dataclass
class PolicyStats:
    """What the adaptive policy decided, for benchmarks and debugging."""

    plans: int = 0  # plans with at least one candidate
    speculating: int = 0  # of which speculated (explorations and probes included)
    explores_off: int = 0  # speculation-off steps taken to measure T(n_base)
    explores_on: int = 0  # plans cut to a few requests: T(n_verify) not measured that high
    probes: int = 0  # speculating steps (a few requests) forced after an off streak
    drafts: int = 0  # drafts planned in total
    skipped: int = 0  # steps run without a plan while speculation was paused
    vetoed: int = 0  # full plans turned off by realized rates below the speculation-off rate
    prefill_off: int = 0  # prefill steps kept off: their batch's decode steps would not draft
    # pauses carried to another batch bucket, or renewed when due a re-plan, by a dry plan
    dry_off: int = 0


class AdaptiveSpecPolicy:
    """Acceptance-driven per-request k and cost-model-driven step decision (module docstring)."""

    def __init__(
        self,
        max_k: int,
        *,
        tracker: AcceptanceTracker | None = None,
        min_gain: float = 1.1,
        min_samples: int = 2,
        explore_interval: int = 16,
        refresh_interval: int = 256,
        probe_interval: int = 128,
        probe_batch: int = 16,
        max_probe_interval: int = 4096,
        explore_requests: int = 4,
        pause_replan_interval: int = 128,
        min_realized: int = 4,
        realized_min_gain: float = 1.05,
        catchup_horizon: int = 32,
    ) -> None:
        self.max_k = max_k
        self.tracker = tracker or AcceptanceTracker()
        self.target = CostCurve()
        self.draft = CostCurve()
        # H by batch size (module docstring, "Sync overhead"), flat past the largest measured
        # batch. H is host wall time, sub-millisecond, and a stall adds whole milliseconds to a
        # sample (H100, greedy batch 8, FP8 draft: 3 of 75 samples at 6.5-9.6 ms, the rest at
        # 0-2 ms). Two FP8-draft runs of four priced H(8) at 6.2-6.5 ms (the mean of two
        # samples, then the lower median) and kept speculation off for good (0.94-0.95x; only
        # speculating steps sample H), so its buckets take their lower quartile: the minimum of
        # up to four samples. And a bucket counts from its third observation (two samples past
        # the provisional one): one stalled sample alone set H(3) at 10 ms and H(54) at 24 ms in
        # a run whose unchained greedy steps were rare (the first proposal after a pause runs
        # the draft's eager loop), and kept its sampled batch of 8 off (0.97x).
        self.overhead = CostCurve(extrapolate=False, quantile=0.25, min_count=3)
        # The same for steps whose proposal was chained behind their verification (plan's
        # ``chained``): their host work between the two is almost none, and one curve for both
        # kinds would price a sampled batch's H at a greedy one's.
        self.overhead_chained = CostCurve(extrapolate=False, quantile=0.25, min_count=3)
        self.min_gain = min_gain
        self.min_samples = min_samples
        self.explore_interval = explore_interval
        self.refresh_interval = refresh_interval
        self.probe_interval = probe_interval
        self.probe_batch = probe_batch
        self.max_probe_interval = max_probe_interval
        self.explore_requests = explore_requests
        self.pause_replan_interval = pause_replan_interval
        self.min_realized = min_realized
        self.realized_min_gain = realized_min_gain
        self.catchup_horizon = catchup_horizon
        # Seconds of a draft catch-up forward by the tokens it feeds (unmeasured: free), flat
        # past the largest size measured: an eager forward's launches dominate small catch-ups
        # (H100, FP8 llama-3.2-1b draft, a slow host: 13.1 ms at 129 tokens, 13.8 at 520, 21.5 at
        # 1032), and carried along that last slope to a batch-64 catch-up of 8192 tokens they
        # priced 129 ms, kept that batch's greedy run off from its first decode step (1.00x
        # where it realizes 1.19x) and so never measured it. Flat, it is tried and measured.
        self.catchup = CostCurve(extrapolate=False)
        # Per batch bucket: (tokens, seconds) of recent steps between two full plans,
        # and, while a veto stands, the plan number at which its samples are dropped for a
        # retrial and the interval until the next one.
        self.realized: dict[int, deque[tuple[int, float]]] = {}
        self._retrial_at: dict[int, int] = {}
        self._retrial_every: dict[int, int] = {}
        # Probe interval by batch bucket (the first one, scaled by the batch, until a probe
        # there stays off): a win at one batch size says nothing of another, so it restarts
        # only its own bucket's.
        self._probe_every: dict[int, int] = {}
        # Speculation-off plans (skipped ones included) by batch bucket since its last
        # speculating plan or probe: a batch passing through a bucket after a long pause
        # elsewhere owes it no probe.
        self._off_streak: dict[int, int] = {}
        self._skip_bucket = 0  # the bucket of the step the last pause let through
        self._num_plans = 0
        self._explored_at: dict[int, int] = {}  # base-tokens bucket -> plan number
        self._measured_at: dict[int, int] = {}  # T bucket -> plan number of its latest sample
        # Batch bucket of the last plan if it drafted nothing (None: it drafted, or no plan yet),
        # and the plans skipped since it.
        self._paused_bucket: int | None = None
        # Batch bucket whose prefill steps may skip planning: decode steps there would
        # speculate, but no full plan there has realized a win yet (_steady_verdict).
        self._prefill_paused: int | None = None
        self._skipped = 0
        self._unfaded = 0  # paused steps whose requests' evidence has not faded yet
        self._pause_limit = pause_replan_interval  # skipped plans before the next plan
        # The latest plan if it was a full speculating plan (not an exploration or probe), else
        # None; and the plan before it. A step verifies the one's drafts, proposes the other's.
        self._full: Plan | None = None
        self._prev_full: Plan | None = None
        self._full_chained = False  # the latest plan's proposal is chained (plan's ``chained``)
        self._catchup_in_step = False  # observe_catchup since the last observe_step
        self.last_plan: Plan | None = None
        self.stats = PolicyStats()

    def plan(
        self,
        candidates: Sequence[tuple[str, int]],
        *,
        num_requests: int,
        base_tokens: int,
        max_padded_k: int = 0,
        steady_requests: int | None = None,
        steady_padded_k: int = 0,
        draft_lag: Sequence[tuple[int, int]] | None = None,
        chained: bool = False,
    ) -> dict[str, int]:
        self._num_plans += 1
        self._fade(candidates)
        self._skipped = 0
        self._paused_bucket = self._prefill_paused = None
        self._prev_full, self._full = self._full, None
        self._full_chained = chained
        if not candidates:
            return {}
        self.stats.plans += 1
        if steady_requests is not None:
            steady = self._steady_verdict(candidates, steady_requests, steady_padded_k)
            if steady != "on":
                self.stats.prefill_off += 1
                self.last_plan = None
                # (unmeasured: no pause, its decode steps explore)
                if steady == "off":
                    self._paused_bucket = _bucket(steady_requests)
                elif steady == "unrealized":  # its prefill steps only: decode steps find out
                    self._prefill_paused = _bucket(steady_requests)
                return {rid: 0 for rid, _ in candidates}
        if steady_requests is None and self._explore_due(base_tokens):
            # Measure speculation off at this batch before trusting an extrapolation.
            self._explored_at[_bucket(base_tokens)] = self._num_plans
            self.last_plan = None
            self.stats.explores_off += 1
            return {rid: 0 for rid, _ in candidates}
        rates = [self.tracker.rate(rid) for rid, _ in candidates]
        caps = [min(cap, self.max_k) for _, cap in candidates]
        plan = self._price(rates, caps, num_requests, base_tokens, max_padded_k, draft_lag, chained)
        # (a prefill step's off rate is its chunks': _steady_verdict checked the decode batch)
        vetoed = (
            steady_requests is None
            and any(plan.num_spec)
            and self._vetoed(num_requests, plan.off_tokens_per_s)
        )
        if vetoed:
            self.stats.vetoed += 1
            plan = Plan([0] * len(candidates), plan.off_tokens_per_s, plan.off_tokens_per_s)
        b = _bucket(num_requests)
        if any(plan.num_spec):
            self._off_streak[b] = 0
            k_explore = (
                0
                if steady_requests is not None  # a prefill step measures nothing
                else self._exploration_k(plan.num_spec, num_requests, base_tokens, max_padded_k)
            )
            if k_explore:
                # T(n_verify) was never measured this high: find out with a few requests and
                # the shallowest verification not measured yet (a cheap step to learn the slope).
                self.stats.explores_on += 1
                plan.num_spec = self._few([min(k, k_explore) for k in plan.num_spec], rates)
            else:  # a measured win: probing may start over
                self._probe_every.pop(b, None)
                # (a prefill step's plan is priced with its chunks: no H / realized sample after)
                self._full = plan if steady_requests is None else None
        else:
            self._off_streak[b] = self._off_streak.get(b, 0) + 1
            if self._off_streak[b] >= self._probe_interval_at(num_requests):
                # Re-measure the speculative side once, with a few requests and two drafts each
                # (a padded verification makes every request pay for the deepest; the second
                # draft forward is timed even when the first is the draft's catch-up prefill);
                # if it stays off, wait twice as long.
                self._off_streak[b] = 0
                self._probe_every[b] = min(
                    2 * self._probe_interval_at(num_requests), self.max_probe_interval
                )
                self.stats.probes += 1
                plan = Plan(
                    self._few([min(c, 2) for c in caps], rates),
                    tokens_per_s=math.nan,
                    off_tokens_per_s=plan.off_tokens_per_s,
                )
        self.last_plan = plan
        step_on = any(plan.num_spec)
        if step_on:
            self.stats.speculating += 1
            self.stats.drafts += sum(plan.num_spec)
        elif max(caps) >= self.max_k:  # (the runner builds the policy with its own max k)
            # (not when every candidate is near its end: the off plan then says nothing about
            # the requests that will replace them)
            self._paused_bucket = _bucket(num_requests)
            # Off for the requests' own low acceptance (at the replica-wide rate a plan would
            # speculate): their evidence fades a step at a time (idle below; _fade for the
            # paused steps), so pause briefly.
            # One early rejection must not keep a batch-1 request off for its whole output.
            prior = [self.tracker.global_rate] * len(rates)
            at_prior = not vetoed and any(
                self._price(
                    prior, caps, num_requests, base_tokens, max_padded_k, chained=chained
                ).num_spec
            )
            self._pause_limit = self.explore_interval if at_prior else self.pause_replan_interval
        for (rid, _), k in zip(candidates, plan.num_spec):
            if k == 0:
                self.tracker.idle(rid)
        return {rid: k for (rid, _), k in zip(candidates, plan.num_spec)}

    def speculation_paused(
        self,
        num_requests: int,
        batch: DryBatch | None = None,
        padded_k: int = 0,
        prefill: bool = False,
    ) -> bool:
        """Whether the next step may skip planning (module docstring, "Pausing"). ``batch`` is
        read only when the paused bucket does not decide; ``padded_k`` is ``max_padded_k`` for
        a decode step of ``num_requests``; ``prefill``: the step will carry prompt chunks (a
        due probe waits for a decode step)."""
        b = _bucket(num_requests)
        due = self._off_streak.get(b, 0) + 1 >= self._probe_interval_at(num_requests)
        if due and not prefill:
            return False
        self._skip_bucket = b  # (skip_plan counts the paused step there)
        replan = self._skipped >= self._pause_limit
        if not replan and (self._paused_bucket == b or (prefill and self._prefill_paused == b)):
            return True
        if batch is None or self._explore_due(num_requests):
            return False
        candidates, lags = batch()
        self._fade(candidates)
        verdict = self._steady_verdict(candidates, num_requests, padded_k, lags)
        if verdict == "unrealized" and prefill:  # (plan's rule for prefill steps)
            self._prefill_paused = b
            return True
        if verdict != "off":
            return False
        self.stats.dry_off += 1
        if num_requests > len(candidates) or max(c for _, c in candidates) >= self.max_k:
            self._paused_bucket = b  # (not if every request is near its end: see plan)
        elif replan:
            self._paused_bucket = None
        if replan:  # the re-plan a long pause was due for, priced off: an off plan's bookkeeping
            self._skipped = 0
            for rid, cap in candidates:
                if cap:
                    self.tracker.idle(rid)
        return True

    def _fade(self, candidates: Sequence[tuple[str, int]]) -> None:
        """The steps paused since the last pricing drafted nothing: the evidence of the requests
        they ran fades one step each, as an off plan's does (a request paused for its own low
        acceptance would otherwise come back at the rate it left with, and pause again)."""
        if self._unfaded:
            for rid, _ in candidates:
                self.tracker.idle(rid, self._unfaded)
            self._unfaded = 0

    def _probe_interval_at(self, num_requests: int) -> int:
        b = _bucket(num_requests)
        first = self.probe_interval * max(1, num_requests // self.probe_batch)
        return self._probe_every.get(b, min(first, self.max_probe_interval))

    def observe_step(self, num_requests: int, seconds: float, num_tokens: int = 0) -> None:
        """Between two full speculating plans: a sample of H and, given the tokens emitted, of
        the realized rate (module docstring)."""
        prev, cur = self._prev_full, self._full
        if self._catchup_in_step:  # the step's wall holds a draft catch-up that D leaves out
            self._catchup_in_step = False
            return
        if prev is not None and cur is not None and seconds > 0:
            h = seconds - prev.verify_s - cur.draft_s
            curve = self.overhead_chained if self._full_chained else self.overhead
            curve.observe(num_requests, max(h, 1e-6))
            if num_tokens > 0:
                window = self.realized.setdefault(_bucket(num_requests), deque(maxlen=16))
                window.append((num_tokens, seconds))

    def _vetoed(self, num_requests: int, off_rate: float) -> bool:
        """Whether realized rates at this batch bucket say a full plan loses to speculation off
        (module docstring, "Realized rates"); schedules and runs the retrials."""
        b = _bucket(num_requests)
        wins = self._realized_wins(num_requests, off_rate)
        if wins is None:
            return False
        if wins:
            self._retrial_at.pop(b, None)
            self._retrial_every.pop(b, None)
            return False
        due = self._retrial_at.get(b)
        if due is None:
            every = self._retrial_every.get(b, self.probe_interval // 2)
            every = min(2 * every, self.max_probe_interval)
            self._retrial_every[b] = every
            self._retrial_at[b] = self._num_plans + every
            return True
        if self._num_plans < due:
            return True
        del self._retrial_at[b]  # retrial: measure the plan again
        self.realized[b].clear()
        return False

    def _realized(self, num_requests: int) -> float | None:
        """Realized tokens/s of recent full speculating steps in this batch bucket (None: fewer
        than ``min_realized`` of them)."""
        window = self.realized.get(_bucket(num_requests))
        if window is None or len(window) < self.min_realized:
            return None
        return sum(n for n, _ in window) / sum(t for _, t in window)

    def _realized_wins(self, num_requests: int, off_rate: float) -> bool | None:
        """Whether full plans at this batch bucket realized ``realized_min_gain`` x
        ``off_rate`` (None: too few of them yet)."""
        realized = self._realized(num_requests)
        return None if realized is None else realized >= off_rate * self.realized_min_gain

    def _price(
        self,
        rates: list[float],
        caps: list[int],
        num_requests: int,
        base_tokens: int,
        max_padded_k: int,
        draft_lag: Sequence[tuple[int, int]] | None = None,
        chained: bool | None = False,
    ) -> Plan:
        """``plan_speculation`` with this policy's curves, overhead (``chained``: of a chained
        proposal; None: not known, the larger of the two) and catch-up price."""
        catchup, per_token = self._catchup(rates, caps, draft_lag)
        return plan_speculation(
            rates,
            caps,
            num_requests=num_requests,
            base_tokens=base_tokens,
            target_time=self.target,
            draft_time=self.draft.settled,
            min_gain=self.min_gain,
            max_padded_k=max_padded_k,
            overhead=self._overhead(num_requests, chained),
            catchup=catchup,
            catchup_s_per_token=per_token,
            drain_tokens=max((left for _, left in draft_lag or ()), default=0),
        )

    def _overhead(self, num_requests: int, chained: bool | None) -> float:
        """H at this batch size for a chained proposal, an unchained one, or (None) one of
        either kind: the larger (0 where unmeasured)."""
        curves = {
            True: (self.overhead_chained,),
            False: (self.overhead,),
            None: (self.overhead, self.overhead_chained),
        }[chained]
        return max((c.settled(num_requests) or 0.0) for c in curves)

    def _steady_verdict(
        self,
        candidates: Sequence[tuple[str, int]],
        steady_requests: int,
        padded_k: int,
        draft_lag: Sequence[tuple[int, int]] | None = None,
    ) -> Literal["on", "off", "unrealized"] | None:
        """Whether a decode step of ``steady_requests`` requests (the candidates, the others at
        the replica-wide acceptance rate with full caps and no lag) would get a full
        speculating plan: "on" where full plans at that batch size also realized their win,
        "off" where it is priced off or they realized a loss, "unrealized" where it is priced
        on and too few full plans ran there to tell; None when T is not measured at that size
        (the decode steps explore first). A prefill step drafts only on "on": it cannot be
        measured (it finds nothing out, and a veto's retrial, which clears the realized
        samples, must run in decode steps)."""
        n = max(steady_requests, len(candidates))
        if self.target(n) is None or self.target.count_near(n) < self.min_samples:
            return None
        fill = n - len(candidates)
        rates = [self.tracker.rate(rid) for rid, _ in candidates]
        caps = [min(cap, self.max_k) for _, cap in candidates]
        rates += [self.tracker.global_rate] * fill
        caps += [self.max_k] * fill
        lags = None if draft_lag is None else [*draft_lag, *[(0, 0)] * fill]
        # (whether those steps' proposals would be chained is not known here)
        plan = self._price(rates, caps, n, n, padded_k, lags, chained=None)
        if not any(plan.num_spec):
            return "off"
        wins = self._realized_wins(n, plan.off_tokens_per_s)
        return "unrealized" if wins is None else ("on" if wins else "off")

    def skip_plan(self) -> None:
        """A step ran without a plan while paused: a speculation-off plan for the schedules."""
        self._prev_full = self._full = None
        self._num_plans += 1
        self._off_streak[self._skip_bucket] = self._off_streak.get(self._skip_bucket, 0) + 1
        self._skipped += 1
        self._unfaded += 1
        self.stats.skipped += 1

    def _exploration_k(
        self, num_spec: list[int], num_requests: int, base_tokens: int, max_padded_k: int
    ) -> int:
        """0 if the plan's verification size was measured (or lies below a measured size);
        else the fewest drafts per request whose verification size was not."""
        pts = self.target.points()
        largest = pts[-1][0] if pts else 0.0
        for k in range(1, max(num_spec) + 1):
            drafts = num_requests * k if k <= max_padded_k else sum(min(x, k) for x in num_spec)
            n = base_tokens + drafts
            if n > largest and self.target.count_near(n) == 0:
                return k
        return 0

    def _few(self, num_spec: list[int], rates: list[float]) -> list[int]:
        """``num_spec`` for the ``explore_requests`` best-accepting requests, 0 for the others:
        an exploration at a large batch then costs one (padded) verification step and a draft
        catch-up for a few requests, not for all."""
        keep = sorted(range(len(rates)), key=lambda i: -rates[i])[: self.explore_requests]
        out = [0] * len(num_spec)
        for i in keep:
            out[i] = num_spec[i]
        return out

    def _explore_due(self, base_tokens: int) -> bool:
        b = _bucket(base_tokens)
        last = self._explored_at.get(b)
        if last is None:
            return self.target.count_near(base_tokens) == 0
        # the latest exploration, or a target step of that size since (overlapped off steps)
        last = max(last, self._measured_at.get(b, -1))
        since = self._num_plans - last
        if self.target.count_near(base_tokens) < self.min_samples:
            return since >= self.explore_interval
        return since >= self.refresh_interval

    def observe_verification(self, request_id: str, drafted: int, accepted: int) -> None:
        self.tracker.observe(request_id, drafted, accepted)

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        self.target.observe(num_tokens, seconds)
        self._measured_at[_bucket(num_tokens)] = self._num_plans

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        self.draft.observe(num_tokens, seconds)

    def observe_catchup(self, num_tokens: int, seconds: float) -> None:
        """A proposal's first forward was a catch-up prefill. Reported when its ids reach the
        host: in the step whose wall time holds the catch-up, which so gives no H or realized
        sample (``observe_step``)."""
        self.catchup.observe(num_tokens, seconds)
        self._catchup_in_step = True

    def _catchup(
        self,
        rates: Sequence[float],
        caps: Sequence[int],
        draft_lag: Sequence[tuple[int, int]] | None,
    ) -> tuple[list[float] | None, float]:
        """Per candidate, the draft tokens to catch up on per step of its horizon (module
        docstring, "Draft catch-up"): a lag past what a proposal feeds anyway (the last step's
        k + 1 tokens, priced in D) spread over the steps the request has left at its expected
        tokens per step, at most ``catchup_horizon``; and the seconds per token of the catch-up
        forward that would feed all the lagging candidates' tokens (its measured time at that
        size over the size: small catch-ups are dominated by a forward's fixed cost)."""
        if draft_lag is None:
            return None, 0.0
        out = []
        fed = 0
        for rate, cap, (lag, left) in zip(rates, caps, draft_lag):
            extra = lag - (self.max_k + 1)
            if extra <= 0 or cap <= 0:
                out.append(0.0)
                continue
            fed += lag
            steps = min(max(left / expected_tokens(rate, cap), 1.0), self.catchup_horizon)
            out.append(extra / steps)
        seconds = self.catchup.settled(fed) if fed else None
        return out, (seconds / fed if seconds is not None else 0.0)

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
