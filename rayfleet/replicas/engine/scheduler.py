"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

One rule: each step, every scheduled request computes tokens [num_computed_tokens,
num_computed_tokens + n) of its token list (prompt + outputs + drafts), n bounded by the step's
token budget. There is no prefill or decode mode: a prompt's first chunk, the rest of a chunked
prompt, a decode step and a speculative verification differ only in n.

Order: running requests first (FCFS), then waiting ones (FCFS) while budget, sequence slots and
blocks last. When a running request cannot get blocks, the newest running request is preempted
(its blocks freed, num_computed_tokens reset) and re-queued at the front of the waiting queue; on
resumption its prefix-cache hits bring most of its KV back.

Speculative decoding adds two things, both expressed in token counts:

- lookahead: a request whose step reaches the end of its verified tokens gets ``num_lookahead``
  extra slots past this step's tokens, where the draft model writes KV for the proposals it makes
  for the next step (capped at what the request can ever hold, so ``can_fit`` stays exact);
- rollback: a request that verified d drafts and got t = accepted + 1 tokens back keeps the KV of
  its first ``num_tokens_before + t - 1`` tokens; rejected positions are simply recomputed next step
  (their slots are overwritten; blocks are not freed: they are the next step's lookahead).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rayfleet.replicas.engine.block_pool import BlockPool
from rayfleet.replicas.engine.kv_cache_manager import KVCacheManager
from rayfleet.replicas.engine.request import Request, RequestStatus, max_num_spec_tokens


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must forget and rebuild: resumed after preemption)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: Any
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed since its last step. A request's
    block list only grows while the runner holds it (rejected drafts roll back
    num_computed_tokens, not blocks; preemption and finishing drop the runner's copy)."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # request_id -> number of tokens to compute this step (in scheduling order).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # request_id -> draft tokens appended after the verified tokens this step.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests finished or preempted since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    # The scheduled Request objects (scheduler-side, the runner ignores them): update() applies
    # a step's tokens only to these very objects, not to a later request reusing an id.
    requests: dict[str, Request] = field(default_factory=dict)
    # Requests running or waiting after this step was scheduled, at most max_num_seqs: the
    # batch a step with prefill chunks is growing into (the speculation policy plans for it).
    num_active_requests: int = 0

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class RunnerOutput:
    """What the runner sampled: for each request that reached the end of its known tokens."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    # Draft tokens proposed for each request's next step (trimmed by the scheduler).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> (drafts verified, drafts accepted) this step, for requests that verified any.
    spec_verified: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        hash_seed: int = 0,
        long_prefill_token_threshold: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> None:
        self.block_size = block_size
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, block_size, hash_seed)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        # Requests the runner knows about, with how many of their blocks it has been sent.
        self._runner_blocks: dict[str, int] = {}
        self.num_preemptions_total = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- intake --------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if not self.kv.can_fit(
            min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        ):
            raise ValueError(
                f"request needs {request.num_prompt_tokens + request.max_tokens} tokens of KV "
                f"cache but the pool holds only {self.pool.num_usable_blocks * self.block_size}"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self, *, lookahead: bool = True) -> SchedulerOutput:
        """The next step. ``lookahead=False``: the step will not run the draft (speculation is
        paused), so no slots are reserved past each request's verified tokens for its KV."""
        slots = self.num_lookahead_tokens if lookahead else 0
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(
                req, n, num_lookahead_tokens=self._lookahead(req, n, slots)
            ):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            else:
                self._emit(req, n, out)
                budget -= n
                i += 1

        # New work only when nothing was preempted: a preemption means blocks are short.
        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit_tokens, budget)
            if self.long_prefill_token_threshold:
                n = min(n, self.long_prefill_token_threshold)
            lookahead = self._lookahead(req, n, slots, num_hit_tokens)
            if not self.kv.allocate_slots(req, n, hits, lookahead):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._emit(req, n, out)
            budget -= n
        out.num_active_requests = min(len(self.running) + len(self.waiting), self.max_num_seqs)
        return out

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        if req.num_pending_tokens and (
            req.num_output_tokens + req.num_pending_tokens >= req.max_tokens
            or req.num_tokens + req.num_pending_tokens >= self.max_model_len
        ):
            return 0  # its in-flight token is its last: it finishes when that arrives
        n = min(req.num_tokens_with_spec + req.num_pending_tokens - req.num_computed_tokens, budget)
        if self.long_prefill_token_threshold:
            n = min(n, self.long_prefill_token_threshold)
        return min(n, self.max_model_len - req.num_computed_tokens)

    def _lookahead(self, req: Request, n: int, slots: int, num_computed: int | None = None) -> int:
        """Slots (at most ``slots``) for the draft's KV past this step's tokens; only when the
        step reaches the end of the verified tokens (only then does the draft propose), and never
        past what the request can ever hold: the draft writes positions < num_tokens +
        max_num_spec_tokens <= cap."""
        if not slots:
            return 0
        total = (req.num_computed_tokens if num_computed is None else num_computed) + n
        if total < req.num_tokens:
            return 0
        cap = min(req.num_prompt_tokens + req.max_tokens, self.max_model_len)
        return max(0, min(slots, cap - total))

    def _emit(self, req: Request, n: int, out: SchedulerOutput) -> None:
        sent = self._runner_blocks.get(req.request_id)
        block_ids = self.kv.block_ids(req.request_id, start=sent or 0)
        if sent is None:
            out.new_requests.append(
                NewRequestData(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    sampling_params=req.sampling_params,
                    block_ids=block_ids,
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
        else:
            out.cached_requests.append(
                CachedRequestData(
                    request_id=req.request_id,
                    new_block_ids=block_ids,
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
        self._runner_blocks[req.request_id] = (sent or 0) + len(block_ids)
        out.num_scheduled_tokens[req.request_id] = n
        out.requests[req.request_id] = req
        if req.spec_token_ids:
            out.spec_token_ids[req.request_id] = list(req.spec_token_ids)
        # Advanced at schedule time: the KV of these tokens is written by this step.
        req.num_computed_tokens += n
        if req.num_computed_tokens >= req.num_tokens + req.num_pending_tokens:
            req.num_pending_tokens += 1  # this step samples; update() will append the token

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_pending_tokens = 0  # a step in flight still delivers its token through update()
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._runner_blocks.pop(req.request_id, None)
        out.preempted_request_ids.add(req.request_id)
        self.waiting.appendleft(req)

    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Append sampled tokens; finish requests on EOS / stop ids / length; take the runner's
        draft proposals. Returns every request that received tokens this step (finished ones
        included).

        A request that verified d drafts gets t = accepted + 1 tokens. Before this step it had
        L verified tokens and scheduling advanced num_computed_tokens to L + d; the KV of the
        accepted drafts is the KV of the tokens they became, so L + t - 1 tokens stay computed and
        the d - (t - 1) rejected positions roll back (their slots are rewritten next step). The
        last new token's KV is never computed yet: it is next step's first input.
        """
        touched: list[Request] = []
        for rid, token_ids in result.sampled_token_ids.items():
            req = sched.requests.get(rid)
            if req is None or req.is_finished or self.requests.get(rid) is not req:
                continue
            req.num_pending_tokens = max(req.num_pending_tokens - 1, 0)
            if sched.spec_token_ids.get(rid):
                # Roll back rejected drafts. (Only here: without drafts nothing is rejected,
                # and with a step in flight num_computed_tokens already counts that step.)
                req.num_computed_tokens = min(
                    req.num_computed_tokens, req.num_tokens + len(token_ids) - 1
                )
            req.spec_token_ids = []
            for tok in token_ids:
                req.output_token_ids.append(tok)
                status = self._check_stop(req, tok)
                if status is not None:
                    self.finish(rid, status)
                    break
            else:
                spec = result.spec_token_ids.get(rid)
                if spec:
                    limit = max_num_spec_tokens(
                        req.num_tokens, req.num_output_tokens, req.max_tokens, self.max_model_len
                    )
                    req.spec_token_ids = list(spec[:limit])
            touched.append(req)
        return touched

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        # The token just appended is output number num_output_tokens; a stop token counts only
        # once min_tokens tokens precede it (the sampler masks it before that).
        if req.num_output_tokens > req.min_tokens and (
            tok in req.eos_token_ids or tok in req.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request: its blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        # Always reported (also for a request the runner dropped at preemption): the runner's
        # per-request state and the speculation policy's statistics are forgotten idempotently.
        self._runner_blocks.pop(request_id, None)
        self._finished_ids.add(request_id)
        return req

    def finish_many(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        return [r for rid in request_ids if (r := self.finish(rid, status)) is not None]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=self.kv.usage,
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    def routing_load(self) -> tuple[int, int]:
        """(queued prefill tokens, decode KV tokens): the load a replica reports to the router.

        Queued prefill: tokens this replica still has to compute before the requests it holds
        start decoding: running ones past their ``num_computed_tokens``, waiting ones past the
        prefix-cache hit they would get now (a waiting request has not looked its prefix up yet,
        so its ``num_computed_tokens`` is 0; counting its whole prompt made a replica whose queue
        is full of cache hits look several times busier than it is). Decode: KV tokens of the
        running sequences past their prompt.
        """
        queued = 0
        for r in self.waiting:
            _, num_hit_tokens = self.kv.get_computed_blocks(r)  # a lookup: nothing is touched
            queued += r.num_tokens - num_hit_tokens
        queued += sum(max(r.num_prompt_tokens - r.num_computed_tokens, 0) for r in self.running)
        decode = sum(
            r.num_computed_tokens
            for r in self.running
            if r.num_computed_tokens >= r.num_prompt_tokens
        )
        return queued, decode

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for req in self.running:
            assert req.status == RequestStatus.RUNNING
            assert req.request_id in self.kv.req_blocks
        for req in self.waiting:
            assert req.request_id not in self.kv.req_blocks, (
                f"waiting {req.request_id} holds blocks"
            )
