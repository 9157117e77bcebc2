"""DraftProposer: the draft model, its paged KV cache, and batched proposals.

The draft shares the target's block table: same block_size, same block ids, its own per-layer KV
tensors sized for its own layers/heads. Slot s of block b holds the target's KV in the target's
tensors and the draft's KV in the draft's, for the same token. So allocation, prefix-cache
sharing, preemption, abort and free are the scheduler's business only; the runner tracks, per
request, how many leading positions hold valid draft KV (``start`` below), and per block whether
its draft KV is complete (see ModelRunner._refresh_draft_flags).

One ``propose`` call, for requests whose verified tokens are x_0 .. x_{L-1}:

    forward 1 (varlen):  x_start .. x_{L-1}     -> logits at L-1 -> d_1   (fills missing draft KV)
    forward j (1 token): d_{j-1} at L + j - 2    -> d_j,  j = 2 .. k

so after it the draft holds KV for positions < L + k - 1 (d_k is never fed). Lookahead slots the
scheduler reserved cover those positions. Requests with ``num_spec == 0`` only fill KV (chunked
prefill catch-up) and take part in forward 1 alone.

In steady state forward 1 feeds 1 token per request (the target's correction after a rejection),
2 (d_k and the bonus token, all accepted) or 3 (after a speculation-off step), so with CUDA graphs
every forward of a proposal replays one. The host knows every forward's positions and slots in
advance; only token ids flow from one forward to the next, on the device, and ``propose``
returns without waiting for them: the ids are copied to the host behind the last forward, the
next verification's inputs take them from the device (ModelRunner._prepare), and the host reads
them (``DraftProposals.resolve``) once that verification is queued. So the host schedules and
prepares the verification while the draft runs, and the device goes from the draft's last
forward to the verification without waiting for the host (see ``_DraftSampling`` for the
exception: penalties read the drafts on the host every forward).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.cuda_graphs import DecodeGraphs, prefill_query_lens
from rayfleet.replicas.model.forward import AttentionKernels
from rayfleet.replicas.runner import (
    allocate_kv_tensors,
    build_attention_metadata,
    kv_cache_bytes_per_block,
    slot_mapping,
)
from rayfleet.replicas.sampler import (
    MIN_TEMPERATURE,
    Sampler,
    SamplerRow,
    argmax_rows,
    mask_min_tokens,
    reads_history,
)
from rayfleet.replicas.spec.proposal_graphs import MAX_BATCH, ProposalGraphs, eligible
from rayfleet.replicas.spec.rejection import DRAFT_STREAM, HistoryView, stream_seed
from rayfleet.replicas.transfer import PinnedStaging, index_tensor, to_device
from rayfleet.sampling_params import SamplingParams

# Query lengths of the draft's CUDA graphs: forwards 2..k feed 1 token per request, forward 1 up
# to 3 in steady state (module docstring).
DRAFT_GRAPH_QUERY_LENS = (1, 2, 3)


@dataclass
class DraftRequest:
    request_id: str
    token_ids: list[int]  # verified tokens: prompt + outputs
    num_prompt_tokens: int
    output_token_ids: list[int]  # == token_ids[num_prompt_tokens:]
    block_ids: list[int]
    params: SamplingParams
    start: int  # the draft's KV is valid for positions < start
    end: int  # feed token_ids[start:end]; end == len(token_ids) when num_spec > 0
    num_spec: int  # drafts to propose (0: fill KV only)


@dataclass
class DraftProposals:
    """What one ``propose`` call drew. The ids stay on the device (``drafts``) until
    ``resolve()``: the next verification reads them from there (ModelRunner._prepare fills its
    input rows from ``drafts``), so the host need not wait for the draft before it schedules and
    launches that verification; ``token_ids``, ``timings`` and ``catchup`` are set by
    ``resolve()``, which waits for the ids' copy to the host."""

    # Request -> its drafts (after resolve()); empty for a proposal that only filled KV.
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    # [rows * kmax] int64 on the device: draft j + 1 of row r at r * kmax + j.
    drafts: torch.Tensor | None = None
    kmax: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # request -> row in drafts
    num_spec: dict[str, int] = field(default_factory=dict)  # request -> drafts it proposed
    # [rows, V] distributions the sampled requests' drafts were drawn from (None: all greedy).
    probs: torch.Tensor | None = None
    prob_rows: dict[str, list[int]] = field(default_factory=dict)
    # (drafting requests, seconds per draft forward) for the cost model: on CUDA the mean time
    # between events around each single-token forward (GPU time, or the host's when the GPU
    # waits for it); elsewhere the proposal's wall time over its forwards. A first forward that
    # was a catch-up prefill (a request fed more than 3 tokens) is left out.
    timings: list[tuple[int, float]] = field(default_factory=list)
    # (tokens fed, seconds) of a first forward that was a catch-up prefill, on CUDA: the cost
    # model's price of draft catch-up.
    catchup: tuple[int, float] | None = None
    # What resolve() finishes: the host copy of drafts and the event after it (CUDA), or the
    # ids already on the host (penalties read them each forward; CPU).
    _host: torch.Tensor | list[list[int]] | None = None
    _ready: torch.cuda.Event | None = None
    _finish_timings: Callable[[], None] | None = None

    @property
    def resolved(self) -> bool:
        """Whether token_ids and the timings are set (resolve() has nothing left to do)."""
        return self._finish_timings is None

    def resolve(self) -> None:
        """Wait for the ids on the host (a no-op once done); sets token_ids and the timings."""
        finish_timings = self._finish_timings
        if finish_timings is None:
            return
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host
        rows = host.view(-1, self.kmax).tolist() if isinstance(host, torch.Tensor) else host
        assert rows is not None
        for rid, r in self.rows.items():
            self.token_ids[rid] = rows[r][: self.num_spec[rid]]
        finish_timings()
        self._host = self._ready = self._finish_timings = None


class DraftProposer:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        attn_kernels: AttentionKernels,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.arch = model.arch
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_cache_dtype or dtype  # of the draft's paged K/V tensors
        self.block_size = block_size
        self.attn_kernels = attn_kernels
        self.eos_token_ids = eos_token_ids
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Optional CUDA graphs for the single-token draft forwards, and for whole greedy
        # proposals at small batches (see enable_cuda_graphs).
        self.graphs = None
        self.proposal_graphs: ProposalGraphs | None = None
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed ^ DRAFT_STREAM)
        self._row_gen = torch.Generator(device=device)
        self._ids_out = PinnedStaging(device)  # the drafts' host copies (DraftProposals)

    @property
    def bytes_per_block(self) -> int:
        a = self.arch
        return kv_cache_bytes_per_block(
            a.num_layers, self.block_size, a.num_kv_heads, a.head_dim, self.kv_dtype
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_tensors(
            self.arch, num_blocks, self.block_size, self.kv_dtype, self.device
        )

    def enable_cuda_graphs(
        self,
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        *,
        proposal_k: int = 0,
        proposal_max_batch: int = MAX_BATCH,
        prefill_tokens: int = 0,
        emulate: bool = False,
    ) -> None:
        """Capture graphs for the draft (CUDA; after allocate_kv_cache): the single-token forwards
        2..k of a proposal, and its first forward when it feeds at most 3 tokens per request
        (``DRAFT_GRAPH_QUERY_LENS``) or, padded to a power of two, up to ``prefill_tokens`` in
        all (a catch-up over a prompt; cuda_graphs.py); with ``proposal_k`` > 0, also whole
        greedy proposals of up to that many drafts, at the capture sizes up to
        ``proposal_max_batch`` (and MAX_BATCH; spec/proposal_graphs.py). ``emulate``: no
        capture, the same padded layouts eagerly (CPU tests)."""
        self.graphs = DecodeGraphs.capture_for(
            self,
            capture_sizes=capture_sizes,
            max_blocks_per_seq=max_blocks_per_seq,
            max_seq_len=max_seq_len,
            query_lens=DRAFT_GRAPH_QUERY_LENS,
            prefill_query_lens=prefill_query_lens(prefill_tokens),
            max_prefill_tokens=prefill_tokens,
            emulate=emulate,
        )
        self.proposal_graphs = None
        proposal_sizes = [s for s in capture_sizes if s <= proposal_max_batch]
        if proposal_k > 0 and proposal_sizes:
            graphs = ProposalGraphs(
                self,
                capture_sizes=proposal_sizes,
                max_k=proposal_k,
                max_blocks_per_seq=max_blocks_per_seq,
                max_seq_len=max_seq_len,
                emulate=emulate,
            )
            if not emulate:
                graphs.capture()
            self.proposal_graphs = graphs

    @property
    def graph_memory_bytes(self) -> int:
        return sum(g.memory_bytes for g in (self.graphs, self.proposal_graphs) if g is not None)

    def _run(
        self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [num_tokens, hidden]
        if self.graphs is not None and self.graphs.can_run(meta, ids.shape[0]):
            return self.graphs.run(ids, pos, meta)
        return self.model(ids, pos, self.attn_kernels.batch(meta, self.kv_caches))

    def _first_forward(self, reqs: list[DraftRequest]) -> tuple[torch.Tensor, int]:
        """Forward 1 over every request's span token_ids[start:end]; returns the hidden state of
        each span's last token [len(reqs), hidden] and the number of tokens fed."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for r in reqs:
            if not 0 <= r.start < r.end <= len(r.token_ids):
                raise ValueError(f"{r.request_id}: bad draft span [{r.start}, {r.end})")
            input_ids.extend(r.token_ids[r.start : r.end])
            positions.extend(range(r.start, r.end))
            slots.extend(slot_mapping(r.block_ids, r.start, r.end, self.block_size))
            qsl.append(qsl[-1] + r.end - r.start)
            seq_lens.append(r.end)
            tables.append(r.block_ids)
        dev = self.device
        last = [n - 1 for n in qsl[1:]]  # each span's last token
        meta, (ids_t, positions_t, last_t) = build_attention_metadata(
            slots,
            qsl,
            seq_lens,
            tables,
            dev,
            [(input_ids, torch.int64), (positions, torch.int64), (last, torch.int64)],
        )
        hidden = self._run(ids_t, positions_t, meta)
        if len(input_ids) == len(reqs):
            return hidden, len(input_ids)
        return hidden.index_select(0, last_t), len(input_ids)

    @torch.inference_mode()
    def propose(self, reqs: list[DraftRequest]) -> DraftProposals:
        """Drafts for every request with num_spec > 0 (see the module docstring). One host
        synchronization at the end, unless a drafting request uses repetition / presence /
        frequency penalties (those read the drafts so far on the host: one per forward)."""
        out = DraftProposals()
        if not reqs:
            return out
        t0 = time.perf_counter()
        timer = _ForwardTimer(self.device)
        timer.mark()
        graphs = self.proposal_graphs
        if graphs is not None and eligible(reqs):
            key = graphs.key(reqs, max(r.num_spec for r in reqs))
            if key is not None:
                drafts = graphs.run(reqs, key)
                timer.mark()
                return self._finish(out, reqs, drafts, timer, t0, forwards=key[2])
        last_hidden, num_fed = self._first_forward(reqs)
        # Drafting requests by num_spec descending: those still drafting at forward j are a
        # prefix, of length counts[j].
        order = sorted(
            (i for i, r in enumerate(reqs) if r.num_spec > 0), key=lambda i: -reqs[i].num_spec
        )
        if not order:  # only KV filling (chunked-prefill catch-up)
            return out
        drafting = [reqs[i] for i in order]
        kmax = drafting[0].num_spec
        counts = [sum(1 for r in drafting if r.num_spec > j) for j in range(kmax)]
        if order != list(range(len(reqs))):
            last_hidden = last_hidden.index_select(0, index_tensor(order, self.device))
        sampling = _DraftSampling(self, drafting)
        # [rows, kmax]: draft j + 1 of row r at [r, j] (rows past counts[j] unused), on the device.
        drafts = torch.zeros(len(drafting), kmax, dtype=torch.int64, device=self.device)
        steps = None
        if kmax > 1:  # forwards 2..kmax: all their inputs at once
            steps = _SingleTokenSteps(drafting, counts, self.block_size, self.device)
        hidden = last_hidden
        for j in range(kmax):
            m = counts[j]
            if j > 0:
                assert steps is not None
                pos, meta = steps.inputs(j)
                hidden = self._run(drafts[:m, j - 1], pos, meta)  # feed d_j of the first m rows
            logits = self.model.compute_logits(hidden)  # [m, V] model dtype
            drafts[:m, j] = sampling.sample(logits, j)
            timer.mark()
        out.probs, out.prob_rows = sampling.probs(drafting)
        return self._finish(
            out,
            drafting,
            drafts,
            timer,
            t0,
            # a request feeding more than 3 tokens (its draft fell behind) makes forward 1 a
            # catch-up, whose time the per-forward price D must not absorb (nor the step's H)
            catchup_tokens=None if max(r.end - r.start for r in reqs) <= 3 else num_fed,
            history=sampling.history,
        )

    @torch.inference_mode()
    def propose_chained(
        self,
        reqs: list[DraftRequest],
        key: tuple[int, int, int],
        chain: list[tuple[int, int, int, int]],
        best: torch.Tensor,
        verified_drafts: torch.Tensor,
    ) -> DraftProposals:
        """The greedy proposal that follows a verification still on the device: one
        whole-proposal graph whose forward 1 feeds the tokens the verification accepts, found
        on the device (``ProposalGraphs.run_chained``, which documents the arguments; ``reqs``
        carry ``start = L - 1``, ``end = L + 1``). No host synchronization."""
        graphs = self.proposal_graphs
        assert graphs is not None
        t0 = time.perf_counter()
        timer = _ForwardTimer(self.device)
        timer.mark()
        drafts = graphs.run_chained(reqs, key, chain, best, verified_drafts)
        timer.mark()
        return self._finish(DraftProposals(), reqs, drafts, timer, t0, forwards=key[2])

    def _finish(
        self,
        out: DraftProposals,
        drafting: list[DraftRequest],
        drafts: torch.Tensor,  # [rows, kmax] on the device, row r = drafting[r]
        timer: _ForwardTimer,
        t0: float,
        *,
        forwards: int = 1,
        catchup_tokens: int | None = None,
        history: list[list[int]] | None = None,
    ) -> DraftProposals:
        """Fill ``out`` with the drafts (their host copy deferred to ``resolve``) and the
        timings. ``forwards``: draft forwards per span of ``timer`` (a whole-proposal graph is
        one span); ``catchup_tokens``: tokens fed by a first forward that was a catch-up
        prefill (its span is priced apart); ``history``: the ids already on the host."""
        kmax = drafts.shape[1]
        out.drafts, out.kmax = drafts.view(-1), kmax
        for i, r in enumerate(drafting):
            out.rows[r.request_id] = i
            out.num_spec[r.request_id] = r.num_spec
        steady = catchup_tokens is None
        wall = (time.perf_counter() - t0) / kmax  # (the CPU computes synchronously)

        def finish_timings() -> None:  # the events are read once the ids arrived
            if not steady:
                first = timer.first()
                out.catchup = None if first is None else (catchup_tokens, first)
            per_forward = timer.per_forward(skip_first=not steady)
            if per_forward is not None:
                out.timings.append((len(drafting), per_forward / forwards))
            elif steady:
                out.timings.append((len(drafting), wall))

        out._finish_timings = finish_timings
        if history is not None:  # penalties read the ids on the host every forward
            out._host = history
        elif self.device.type == "cuda":  # the proposal's one synchronization, deferred
            host = self._ids_out.take_ids(drafts.numel())
            host.copy_(drafts.view(-1), non_blocking=True)
            out._host, out._ready = host, torch.cuda.Event()
            out._ready.record()
            self._ids_out.queued()
        else:
            out._host = drafts.view(-1)
        return out


class _ForwardTimer:
    """CUDA events between a proposal's forwards (none elsewhere); read after the proposal's
    synchronization, so timing adds none."""

    def __init__(self, device: torch.device) -> None:
        self.events: list[torch.cuda.Event] | None = [] if device.type == "cuda" else None

    def mark(self) -> None:
        if self.events is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def first(self) -> float | None:
        """Seconds of forward 1 (with its logits and sampling); None without events."""
        if self.events is None or len(self.events) < 2:
            return None
        return self.events[0].elapsed_time(self.events[1]) / 1e3

    def per_forward(self, skip_first: bool) -> float | None:
        """Mean seconds per forward (forward 1 left out if ``skip_first``); None without events
        or forwards to time."""
        if self.events is None:
            return None
        spans = [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        if skip_first:
            spans = spans[1:]
        return sum(spans) / len(spans) / 1e3 if spans else None


class _SingleTokenSteps:
    """Inputs of forwards 2..kmax of a proposal, built on the host at once: forward j feeds
    d_j of the first counts[j] drafting requests at position end + j - 1 (one host-to-device
    copy for all of them; the token ids come from the previous forward, on the device)."""

    def __init__(
        self, drafting: list[DraftRequest], counts: list[int], block_size: int, dev: torch.device
    ) -> None:
        self.counts = counts  # len(counts) = kmax >= 2
        m1 = counts[1]
        width = max(len(r.block_ids) for r in drafting[:m1])
        table = torch.tensor(
            [b for r in drafting[:m1] for b in r.block_ids + [0] * (width - len(r.block_ids))],
            dtype=torch.int64,
        ).view(m1, width)
        ends = torch.tensor([r.end for r in drafting[:m1]], dtype=torch.int64)
        pos = torch.cat([ends[: counts[j]] + (j - 1) for j in range(1, len(counts))])
        rows = torch.cat([torch.arange(counts[j]) for j in range(1, len(counts))])
        slots = table[rows, pos // block_size] * block_size + pos % block_size
        n = pos.shape[0]
        self.offsets = [0, 0]  # forward j's rows start at offsets[j] (j >= 1)
        for j in range(1, len(counts)):
            self.offsets.append(self.offsets[-1] + counts[j])
        self.seq_lens = (pos + 1).tolist()
        # One copy: positions, slots, seq_lens, block table (int64; narrowed on the device).
        packed = to_device(torch.cat([pos, slots, pos + 1, table.view(-1)]), torch.int64, dev)
        self.positions, self.slot_mapping = packed[:n], packed[n : 2 * n]
        self.seq_lens_dev = packed[2 * n : 3 * n].to(torch.int32)
        self.block_tables = packed[3 * n :].view(m1, width).to(torch.int32)
        self.qsl = torch.arange(m1 + 1, dtype=torch.int32, device=dev)

    def inputs(self, j: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """Positions [counts[j]] and attention metadata of forward j + 1 (j >= 1)."""
        m, o = self.counts[j], self.offsets[j]
        seq_lens = self.seq_lens[o : o + m]
        return self.positions[o : o + m], AttentionMetadata(
            slot_mapping=self.slot_mapping[o : o + m],
            query_start_loc=self.qsl[: m + 1],
            seq_lens=self.seq_lens_dev[o : o + m],
            block_tables=self.block_tables[:m],
            max_query_len=1,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=list(range(m + 1)),
            seq_lens_cpu=seq_lens,
        )


class _DraftSampling:
    """Draws the drafts of one proposal, row r = drafting[r], forward j = draft position j + 1,
    through the sampler's transform (penalties see the drafts proposed so far; min_tokens counts
    them). Tokens stay on the device unless penalties need the history on the host."""

    def __init__(self, proposer: DraftProposer, drafting: list[DraftRequest]) -> None:
        self.p = proposer
        self.drafting = drafting
        eos = proposer.eos_token_ids
        # Only temperature / top-k / top-p / min-p are read from these rows.
        self.rows = [SamplerRow(r.params, (), (), eos) for r in drafting]
        self.greedy = [i for i, r in enumerate(drafting) if r.params.temperature < MIN_TEMPERATURE]
        self.sampled = [
            i for i, r in enumerate(drafting) if r.params.temperature >= MIN_TEMPERATURE
        ]
        self.history: list[list[int]] | None = None
        if any(reads_history(r.params) for r in drafting):
            self.history = [[] for _ in drafting]
        self.prob_chunks: list[tuple[torch.Tensor, list[int]]] = []  # (probs, rows) per forward

    def sample(self, logits: torch.Tensor, j: int) -> torch.Tensor:  # [m] long, on the device
        """Draft position j + 1 of the first m = logits.shape[0] rows."""
        m = logits.shape[0]
        dev = logits.device
        eos = self.p.eos_token_ids
        drafting = self.drafting[:m]
        if self.history is not None:
            history = self.history
            x = Sampler.apply_penalties(
                logits.float(),
                [
                    SamplerRow(
                        params=r.params,
                        # Only the repetition penalty reads the prompt: skip copying it otherwise.
                        prompt_token_ids=r.token_ids[: r.num_prompt_tokens]
                        if r.params.repetition_penalty != 1.0
                        else (),
                        output_token_ids=HistoryView(r.output_token_ids, history[i]),
                        eos_token_ids=eos,
                    )
                    for i, r in enumerate(drafting)
                ],
            )
        else:
            x = logits  # fresh from compute_logits: masked in place (model dtype)
            mask_min_tokens(x, ((r.params, len(r.output_token_ids) + j, eos) for r in drafting))
        sampled = [i for i in self.sampled if i < m]
        if not sampled:
            tokens = argmax_rows(x)
        else:
            tokens_s, probs = self._race(x, sampled, j)
            self.prob_chunks.append((probs, sampled))
            if len(sampled) == m:
                tokens = tokens_s
            else:
                g = index_tensor([i for i in self.greedy if i < m], dev)
                tokens = torch.empty(m, dtype=torch.long, device=dev)
                tokens[g] = argmax_rows(x[g])
                tokens[index_tensor(sampled, dev)] = tokens_s
        if self.history is not None:
            for h, t in zip(self.history, tokens.tolist()):
                h.append(t)
        return tokens

    def _race(
        self, x: torch.Tensor, sampled: list[int], j: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [S] of the sampled rows and the distributions they were drawn from [S, V]."""
        dev = x.device
        p = self.p
        sub = x if len(sampled) == x.shape[0] else x[index_tensor(sampled, dev)]
        probs = Sampler.sampling_probs(sub, [self.rows[i] for i in sampled])  # [S, V]
        unseeded = [n for n, i in enumerate(sampled) if self.rows[i].params.seed is None]
        if len(unseeded) == len(sampled):
            e = torch.empty_like(probs).exponential_(generator=p._gen)
        else:
            e = torch.empty_like(probs)
            if unseeded:
                noise = torch.empty(len(unseeded), probs.shape[1], device=dev)
                e[index_tensor(unseeded, dev)] = noise.exponential_(generator=p._gen)
            for n, i in enumerate(sampled):
                seed = self.rows[i].params.seed
                if seed is not None:
                    # The draft token at output position o of a seeded request: its own stream.
                    o = len(self.drafting[i].output_token_ids) + j
                    p._row_gen.manual_seed(stream_seed(seed, o, DRAFT_STREAM))
                    e[n].exponential_(generator=p._row_gen)
        e.clamp_(min=torch.finfo(e.dtype).tiny)
        return argmax_rows(probs / e), probs

    def probs(
        self, drafting: list[DraftRequest]
    ) -> tuple[torch.Tensor | None, dict[str, list[int]]]:
        """All sampled rows' distributions [rows, V] and each request's rows in it (draft
        position order)."""
        if not self.prob_chunks:
            return None, {}
        rows: dict[str, list[int]] = {}
        o = 0
        for probs, sampled in self.prob_chunks:
            for n, i in enumerate(sampled):
                rows.setdefault(drafting[i].request_id, []).append(o + n)
            o += probs.shape[0]
        chunks = [c for c, _ in self.prob_chunks]
        return (torch.cat(chunks) if len(chunks) > 1 else chunks[0]), rows
