"""ModelRunner: SchedulerOutput -> batch tensors -> forward -> sampled token ids.

The runner keeps, per request it has been sent, a copy of the verified token ids and the block
table; each step the scheduler sends only what changed (see scheduler.NewRequestData /
CachedRequestData). Tokens to compute this step for a request are
``(token_ids + draft_ids)[num_computed : num_computed + n]``; if that reaches the end of the
verified tokens, the runner samples the next token from the last position.

With a draft model (``proposer``), a request that carries k drafts gets logits at its last
verified position and at each draft position (k + 1 rows), which the RejectionSampler turns into
accepted tokens; requests without drafts are sampled as usual in the same step. Then the draft
proposes the next step's drafts for the requests the spec policy picks (see spec/adaptive.py),
and the runner times both forwards for the policy's cost model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.cuda_graphs import DecodeGraphs, prefill_query_lens
from rayfleet.replicas.engine.request import max_num_spec_tokens
from rayfleet.replicas.engine.scheduler import RunnerOutput, SchedulerOutput
from rayfleet.replicas.model.forward import AttentionKernels, ForwardBatch
from rayfleet.replicas.sampler import (
    MIN_TEMPERATURE,
    Sampler,
    SamplerRow,
    argmax_rows,
    reads_history,
)
from rayfleet.replicas.spec.adaptive import AdaptiveSpecPolicy
from rayfleet.replicas.spec.rejection import RejectionSampler, SpecRow
from rayfleet.replicas.transfer import PinnedStaging, to_device_packed
from rayfleet.replicas.transfer import index_tensor as _index

if TYPE_CHECKING:
    from rayfleet.replicas.engine.request import Request
    from rayfleet.replicas.spec.adaptive import SpecPolicy
    from rayfleet.replicas.spec.proposer import DraftProposals, DraftProposer, DraftRequest

# Verification graphs are captured for batch size * query length up to this many tokens (their
# memory pool is sized by the largest); bigger verification steps are compute bound and run
# eagerly.
VERIFY_GRAPH_MAX_TOKENS = 4096
# What the scheduler holds for a draft whose id is still on the device (never fed to a model:
# the runner's inputs take the id from the device; see ModelRunner._prepare).
DRAFT_PLACEHOLDER = -1


@dataclass
class _RunnerRequest:
    token_ids: list[int]  # prompt + verified outputs
    num_prompt_tokens: int
    block_ids: list[int]
    params: Any
    # Output ids as a list view for the sampler's penalties (kept in sync with token_ids).
    output_token_ids: list[int] = field(default_factory=list)
    # Speculation. The draft's KV is valid (belongs to these tokens) for positions
    # < draft_num_computed; past len(token_ids) that means the drafts it fed itself.
    draft_num_computed: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # proposed, awaiting verification
    # The proposal whose drafts are still only on the device (spec_token_ids is empty until
    # ModelRunner._resolve_drafts); the next verification reads them from its ``drafts``.
    pending: DraftProposals | None = None
    # (tensor, rows) of the distributions the drafts were drawn from; None for greedy requests.
    draft_probs: tuple[torch.Tensor, list[int]] | None = None
    flags_dv: int = 0  # draft-valid verified prefix at the last _refresh_draft_flags
    # Tokens sampled by launched steps not yet resolved (overlapped scheduling): they follow
    # token_ids; the newest is in ModelRunner._prev_tokens until its step resolves.
    num_pending: int = 0


@dataclass
class _StagedGraph:
    """A step already written into the decode graphs' static inputs (DecodeGraphs.stage)."""

    size: int  # the graph's batch size
    q: int  # tokens per request
    num_tokens: int
    seq_lens: list[int]


@dataclass
class _StepInputs:
    """One step's batch, on the device, plus what sampling needs. A step that replays a graph
    with every request computing q tokens is staged into the graph's inputs at once (``graph``;
    ``ids``, ``positions`` and ``meta`` are then None)."""

    ids: torch.Tensor | None  # [T] int64
    positions: torch.Tensor | None  # [T] int64
    meta: AttentionMetadata | None
    graph: _StagedGraph | None
    sample_rids: list[str]  # requests that sample this step, in row order
    num_spec: list[int]  # drafts verified, per sampling request
    logits_idx: list[int]  # rows of the hidden states to compute logits for
    logits_rows: torch.Tensor | None  # the same on the device (int64); None: every row, in order
    starts: dict[str, int]


@dataclass
class PendingStep:
    """A launched step whose sampled tokens are still on their way to the host (see launch)."""

    states: list[tuple[str, _RunnerRequest]]  # the sampling requests, in row order
    host_tokens: torch.Tensor  # [len(states)] int64 on the host (pinned on CUDA)
    ready: torch.cuda.Event | None  # recorded after the device-to-host copy (CUDA)
    # With a draft model, a decode step's (tokens, start, end) events: its device time feeds the
    # speculation policy's T(n) when the tokens arrive (no synchronous step to measure it).
    timing: tuple[int, torch.cuda.Event, torch.cuda.Event] | None = None


@dataclass
class _Chain:
    """A step's draft plan, made before its verification's result is on the host, and the
    proposal chained behind that verification on the device (ModelRunner._chain)."""

    plan: dict[str, int]  # the step's plan: every candidate's drafts (0: none)
    reqs: list[DraftRequest]  # the chained requests (start = L - 1, end = L + 1), in row order
    proposals: DraftProposals | None  # None: planned, nothing chained (proposed after the step)
    best_host: torch.Tensor | None = None  # [N] int64: the target's argmax per verified row
    ready: torch.cuda.Event | None = None  # recorded after best_host's copy (CUDA)

    def best(self) -> list[int] | None:
        """The argmax per row on the host (waits for the verification, not for the draft)."""
        if self.best_host is None:
            return None
        if self.ready is not None:
            self.ready.synchronize()
        return self.best_host.tolist()


def slot_mapping(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end) of a request with block table ``block_ids``."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def padded_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [len(tables), longest] int32 array, short rows padded with 0 (the
    null block)."""
    padded = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
    for row, t in zip(padded, tables):
        row[: len(t)] = t
    return padded


def build_attention_metadata(
    slots: list[int],
    qsl: list[int],
    seq_lens: list[int],
    tables: list[list[int]],
    device: torch.device,
    extra: Sequence[tuple[Sequence[int], torch.dtype]] = (),
) -> tuple[AttentionMetadata, list[torch.Tensor]]:
    """One varlen batch's attention inputs (shared by the target and the draft forward), and
    the ``extra`` host arrays (input ids, positions, ...) on the device, all in one copy."""
    slots_t, qsl_t, seq_lens_t, tables_t, *extra_t = to_device_packed(
        [
            (slots, torch.int64),
            (qsl, torch.int32),
            (seq_lens, torch.int32),
            (padded_tables(tables), torch.int32),
            *extra,
        ],
        device,
    )
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        query_start_loc=qsl_t,
        seq_lens=seq_lens_t,
        block_tables=tables_t,
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seq_lens))),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return meta, extra_t


def allocate_kv_tensors(
    arch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].

    Zeroed, not empty: padded/masked positions are multiplied by zero weights, and stale NaN bit
    patterns in never-written slots would turn 0 * NaN into NaN.
    """
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(arch.num_layers)
    ]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        attention_backend: str | None,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        proposer: DraftProposer | None = None,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        spec_policy: SpecPolicy | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.arch = model.arch
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_cache_dtype or dtype  # of the paged K/V tensors
        self.block_size = block_size
        self.attn_kernels = AttentionKernels.for_backend(attention_backend)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(seed=seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.requests: dict[str, _RunnerRequest] = {}
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens if proposer is not None else 0
        self.max_model_len = max_model_len or self.arch.max_position_embeddings
        self.spec_policy = spec_policy
        if proposer is not None:
            self.rejection_sampler = RejectionSampler(seed=seed)
            if self.spec_policy is None:
                self.spec_policy = AdaptiveSpecPolicy(num_speculative_tokens)
        # block id -> its draft KV is complete for all block_size slots (see _refresh_draft_flags).
        self._draft_block_valid: list[bool] = []
        # Decode CUDA graphs of the target (enable_cuda_graphs); None = always eager.
        self.graphs: DecodeGraphs | None = None
        # Overlapped scheduling: the newest launched step's sampled tokens (device) and the row
        # of each sampling request in it, for the next step's inputs (see launch).
        self._prev_tokens: torch.Tensor | None = None
        self._pending: list[DraftProposals] = []  # proposals whose ids are not on the host yet
        # Greedy proposals that fit a whole-proposal graph are chained behind their verification
        # on the device (_chain); False proposes after the verification's result (A/B runs).
        self.chain_proposals = True
        self._prev_rows: dict[str, tuple[_RunnerRequest, int]] = {}
        # Inputs of steps staged into the graphs, read by the staging kernel in pinned memory;
        # and the ids of launched steps, stored there by the sampler.
        self._staging = PinnedStaging(device)
        self._token_out = PinnedStaging(device)

    # ---- KV cache ------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id costs: the target's KV, plus the draft's (same block ids)."""
        target = kv_cache_bytes_per_block(
            self.arch.num_layers,
            self.block_size,
            self.arch.num_kv_heads,
            self.arch.head_dim,
            self.kv_dtype,
        )
        return target + (self.proposer.bytes_per_block if self.proposer is not None else 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_tensors(
            self.arch, num_blocks, self.block_size, self.kv_dtype, self.device
        )
        self.num_blocks = num_blocks
        if self.proposer is not None:
            self.proposer.allocate_kv_cache(num_blocks)
            self._draft_block_valid = [False] * num_blocks

    def enable_cuda_graphs(
        self,
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        *,
        prefill_tokens: int = 0,
        emulate: bool = False,
    ) -> None:
        """Capture the target's graphs (CUDA, after allocate_kv_cache): decode steps (one token
        per request) at every size in ``capture_sizes`` and, with a draft model, verification
        steps (at most q = 1 + k tokens per request, padded to q; k = 1..num_speculative_tokens)
        at the sizes with size * q <= VERIFY_GRAPH_MAX_TOKENS; short prefills of up to
        ``prefill_tokens`` tokens in a step, padded to a power of two per request (cuda_graphs.py).
        Other steps (long prefill chunks, mixed steps) run eagerly. ``emulate``: no capture, the
        same padded layouts eagerly (CPU tests)."""
        self.graphs = DecodeGraphs.capture_for(
            self,
            capture_sizes=capture_sizes,
            max_blocks_per_seq=max_blocks_per_seq,
            max_seq_len=max_seq_len,
            query_lens=range(1, self.num_speculative_tokens + 2),
            max_multi_query_tokens=VERIFY_GRAPH_MAX_TOKENS,
            prefill_query_lens=prefill_query_lens(prefill_tokens),
            max_prefill_tokens=prefill_tokens,
            emulate=emulate,
        )

    @torch.inference_mode()
    def profile_num_blocks(
        self, max_num_batched_tokens: int, max_num_seqs: int, gpu_memory_utilization: float
    ) -> tuple[int, dict[str, int]]:
        """CUDA only: run the largest step the scheduler can issue on dummy inputs, measure the
        peak memory of weights + activations, and turn ``gpu_memory_utilization`` of the device's
        memory minus that peak (and memory outside torch's allocator) into KV blocks."""
        assert self.device.type == "cuda"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n_tok = max_num_batched_tokens
        n_seq = max(1, min(max_num_seqs, n_tok))
        per_seq = [n_tok // n_seq + (1 if i < n_tok % n_seq else 0) for i in range(n_seq)]
        blocks_per_seq = -(-max(per_seq) // self.block_size)
        self.allocate_kv_cache(blocks_per_seq * n_seq + 1)
        positions, slots, qsl, table = [], [], [0], []
        for s, n in enumerate(per_seq):
            base = 1 + s * blocks_per_seq
            row = list(range(base, base + blocks_per_seq))
            positions.extend(range(n))
            slots.extend(slot_mapping(row, 0, n, self.block_size))
            qsl.append(qsl[-1] + n)
            table.append(row)
        meta, _ = self._metadata(slots, qsl, per_seq, table)
        ids = torch.randint(0, self.arch.vocab_size, (n_tok,), device=self.device)
        hidden = self.model(ids, torch.tensor(positions, device=self.device), self._batch(meta))
        if self.num_speculative_tokens:
            # Verification takes k + 1 rows of logits per request, and the verifier holds
            # probabilities beside them (target, draft, residual): profile that worst case.
            rows = min(n_tok, n_seq * (self.num_speculative_tokens + 1))
            logits = self.model.compute_logits(hidden[:rows]).float()
            probs = logits.softmax(dim=-1)
            draft_probs = probs.clone()
            del logits, probs, draft_probs
        else:
            # (float32: what a sampled row's penalties / probabilities compute in)
            self.model.compute_logits(hidden[torch.tensor(qsl[1:], device=self.device) - 1]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        kv_profile = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        if self.proposer is not None:
            kv_profile += sum(k.numel() * k.element_size() * 2 for k, _ in self.proposer.kv_caches)
            self.proposer.kv_caches = []
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = int(total * gpu_memory_utilization) - (peak - kv_profile) - max(non_torch, 0)
        num_blocks = max(budget // self.bytes_per_block, 0)
        return num_blocks, {
            "total_bytes": total,
            "peak_weights_activations_bytes": peak - kv_profile,
            "non_torch_bytes": non_torch,
            "kv_budget_bytes": budget,
        }

    # ---- the step ------------------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.requests.pop(rid, None)
        if self.spec_policy is not None:
            for rid in sched.finished_request_ids:
                self.spec_policy.forget(rid)
        if self.proposer is not None:
            # Blocks allocated this step are about to be written by the target; any draft KV they
            # hold is a previous owner's. Clear their flags before a request of this same step
            # that hits them (prefix-cache registration happens at schedule time) trusts them.
            bs = self.block_size
            for new in sched.new_requests:
                for b in new.block_ids[new.num_computed_tokens // bs :]:
                    self._draft_block_valid[b] = False
            for cached in sched.cached_requests:
                for b in cached.new_block_ids:
                    self._draft_block_valid[b] = False
        for new in sched.new_requests:
            st = _RunnerRequest(
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_ids=list(new.block_ids),
                params=new.sampling_params,
                output_token_ids=list(new.output_token_ids),
            )
            if self.proposer is not None:
                st.draft_num_computed = self._valid_draft_prefix(
                    st.block_ids, new.num_computed_tokens
                )
                st.flags_dv = st.draft_num_computed
            self.requests[new.request_id] = st
        for cached in sched.cached_requests:
            st = self.requests[cached.request_id]
            st.block_ids.extend(cached.new_block_ids)

    def _start_positions(self, sched: SchedulerOutput) -> dict[str, int]:
        starts = {r.request_id: r.num_computed_tokens for r in sched.new_requests}
        starts.update({r.request_id: r.num_computed_tokens for r in sched.cached_requests})
        return starts

    def _metadata(
        self,
        slots: list[int],
        qsl: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        extra: Sequence[tuple[Sequence[int], torch.dtype]] = (),
    ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        return build_attention_metadata(slots, qsl, seq_lens, tables, self.device, extra)

    def _batch(self, meta: AttentionMetadata) -> ForwardBatch:
        return self.attn_kernels.batch(meta, self.kv_caches)

    def _prepare(self, sched: SchedulerOutput) -> _StepInputs | None:
        """Apply the scheduler's changes and build the step's batch (None: nothing to run).

        A position past a request's known tokens is the token its previous step sampled and has
        not delivered yet (overlapped scheduling; one such position per request, its only one
        this step): its input id is taken from ``_prev_tokens`` on the device."""
        self._update_states(sched)
        if sched.is_empty:
            return None
        starts = self._start_positions(sched)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rids: list[str] = []
        num_spec: list[int] = []  # drafts verified, per sampling request
        logits_idx: list[int] = []
        # Input rows whose id is on the device only, and where: a previous step's sampled token
        # (overlapped scheduling: its row in _prev_tokens) or a draft not yet on the host (its
        # index in the pending proposal's drafts). A step has one kind or neither: overlapped
        # steps verify no drafts.
        fill_dst: list[int] = []
        fill_src: list[int] = []
        fill_from: torch.Tensor | None = None
        for rid, n in sched.num_scheduled_tokens.items():
            st = self.requests[rid]
            start = starts[rid]
            spec = sched.spec_token_ids.get(rid)
            seq = st.token_ids + spec if spec else st.token_ids
            known = seq[start : start + n]
            if len(known) < n:
                prev, row = self._prev_rows[rid]
                assert prev is st and len(known) == n - 1 and st.num_pending, rid
                fill_dst.append(len(input_ids) + n - 1)
                fill_src.append(row)
                fill_from = self._prev_tokens
                known.append(0)
            elif spec and st.pending is not None:
                # Draft j (0-based) sits at position len(token_ids) + j; the proposal's ids are
                # still on the device (placeholders in ``spec``).
                pending = st.pending
                assert fill_from is None or fill_from is pending.drafts, rid
                fill_from = pending.drafts
                base = pending.rows[rid] * pending.kmax - len(st.token_ids)
                for p in range(max(start, len(st.token_ids)), start + n):
                    fill_dst.append(len(input_ids) + p - start)
                    fill_src.append(base + p)
            input_ids.extend(known)
            positions.extend(range(start, start + n))
            table = st.block_ids
            slots.extend(slot_mapping(table, start, start + n, bs))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            num_verified = len(st.token_ids) + st.num_pending
            if start + n >= num_verified:
                # start <= num_verified - 1 always (the newest token's KV is never computed
                # before its step), so the rows at positions num_verified-1 .. start+n-1 are
                # here: one for the next token, one per draft the step reached (scheduling may
                # cut the drafts short; the rest are dropped).
                k = start + n - num_verified
                if st.pending is not None:  # (the ids are on the device: compare counts)
                    differ = k > st.pending.num_spec[rid]
                else:
                    differ = bool(k) and spec is not None and spec[:k] != st.spec_token_ids[:k]
                if differ:
                    raise RuntimeError(f"{rid}: scheduled drafts differ from the proposed ones")
                sample_rids.append(rid)
                num_spec.append(k)
                logits_idx.extend(range(qsl[-1] - k - 1, qsl[-1]))
        b, num_tokens = len(seq_lens), qsl[-1]
        q = max(qsl[i + 1] - qsl[i] for i in range(b))
        every_row = len(logits_idx) == num_tokens  # (then they are in order)
        if (
            self.graphs is not None
            and num_tokens == b * q
            and self.graphs.fits(b, q, num_tokens, max(map(len, tables)), max(seq_lens))
        ):
            assert fill_from is not None or not fill_dst
            fill = np.full(num_tokens, -1, dtype=np.int64)
            fill[fill_dst] = fill_src
            *src, fill_h = self._staging.stage(
                [
                    (input_ids, torch.int64),
                    (positions, torch.int64),
                    (slots, torch.int64),
                    (seq_lens, torch.int32),
                    (padded_tables(tables), torch.int32),
                    (fill, torch.int64),
                ]
            )
            size = self.graphs.stage(
                tuple(src),  # type: ignore[arg-type]
                q,
                fill_h if fill_dst else None,
                fill_from if fill_dst else None,
            )
            self._staging.queued()
            return _StepInputs(
                ids=None,
                positions=None,
                meta=None,
                graph=_StagedGraph(size, q, num_tokens, seq_lens),
                sample_rids=sample_rids,
                num_spec=num_spec,
                logits_idx=logits_idx,
                logits_rows=None if every_row else _index(logits_idx, self.device),
                starts=starts,
            )
        meta, (ids_t, positions_t, src_t, dst_t, rows_t) = self._metadata(
            slots,
            qsl,
            seq_lens,
            tables,
            [(v, torch.int64) for v in (input_ids, positions, fill_src, fill_dst, logits_idx)],
        )
        if fill_dst:
            assert fill_from is not None
            ids_t[dst_t] = fill_from[src_t]
        return _StepInputs(
            ids=ids_t,
            positions=positions_t,
            meta=meta,
            graph=None,
            sample_rids=sample_rids,
            num_spec=num_spec,
            logits_idx=logits_idx,
            logits_rows=None if every_row else rows_t,
            starts=starts,
        )

    def _forward(self, inp: _StepInputs) -> torch.Tensor | None:
        """The model over the batch; logits [len(logits_idx), V] of the sampled rows, or None
        when no request samples this step (its KV is written all the same)."""
        g = inp.graph
        if g is not None:
            assert self.graphs is not None
            hidden = self.graphs.replay(g.size, g.q, g.num_tokens, g.seq_lens)
        else:
            assert inp.ids is not None and inp.positions is not None and inp.meta is not None
            if self.graphs is not None and self.graphs.can_run(inp.meta, inp.ids.shape[0]):
                hidden = self.graphs.run(inp.ids, inp.positions, inp.meta)
            else:
                hidden = self.model(inp.ids, inp.positions, self._batch(inp.meta))
        if not inp.logits_idx:
            return None
        if inp.logits_rows is not None:  # else every row is sampled, in order
            hidden = hidden[inp.logits_rows]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the step and return its sampled tokens (synchronizes with the device)."""
        t_start = time.perf_counter()
        inp = self._prepare(sched)
        if inp is None:
            return RunnerOutput()
        # The cost model's T(n) is the device's time for the step (from its first kernel to its
        # sampled ids) where events can time it: a speculation-off step overlaps its host work
        # with the previous step's device work, so that is what it costs; a speculating step's
        # host work is priced apart (H, spec/adaptive.py). Elsewhere: wall time from here. A
        # step without drafts records its end when its sampling is queued, before the host
        # waits for the ids and handles them (that host time is not the device's: it put T(64)
        # 0.7-1.1 ms above the overlapped steps' 7.1-7.5 ms on the H100, within 0.2 ms after);
        # a verification's after the verifier, whose host work H does not price.
        timed = self.proposer is not None and self.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if timed else None
        if events is not None:
            events[0].record()
        logits = self._forward(inp)
        chain = None
        if logits is not None and self.proposer is not None and self.chain_proposals:
            chain = self._chain(sched, inp, logits, events)
        # The drafts this verification checks are on the host only now: their copy was queued
        # before this forward, so this waits for the draft, not for the forward.
        self._resolve_drafts()
        out = RunnerOutput()
        # (without drafts every sampled row is a plain one: the Sampler runs, and calls this)
        queued = events[1].record if events is not None and not any(inp.num_spec) else None
        if logits is not None:
            best = chain.best() if chain is not None else None
            self._sample(logits, inp.sample_rids, inp.num_spec, out, queued, best)
        if self.proposer is not None:
            if events is not None and logits is not None:
                if queued is None and (chain is None or chain.proposals is None):
                    events[1].record()
                events[1].synchronize()  # sampling synchronized already: returns at once
                seconds = events[0].elapsed_time(events[1]) / 1e3
            else:  # (nothing sampled: no synchronization to wait for, and the time is unused)
                seconds = time.perf_counter() - t_start
            self._speculate(sched, inp.starts, inp.sample_rids, out, seconds, chain)
        return out

    # ---- overlapped scheduling -----------------------------------------------------------------
    # launch(N+1) runs before resolve(N): the engine schedules and prepares step N+1 while the
    # device still runs step N. Only for requests whose sampling does not read their generated
    # ids (see sampler.needs_host_history): a request's newest token can still be on the device
    # when its next step is prepared. With a draft model, only for steps without drafts while the
    # policy has speculation paused: the draft does not run, so its KV falls behind the target's
    # (draft_num_computed stays put; the first proposal after the pause catches up from there)
    # and the blocks the target writes are flagged not draft-valid. Planning and drafting happen
    # only in synchronous steps, which the engine runs after draining the step in flight.

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingStep | None:
        """Queue the step's device work; its sampled tokens stay on the device (they feed the
        next step) and are copied to the host asynchronously. None when nothing runs."""
        inp = self._prepare(sched)
        if inp is None:
            return None
        if self.proposer is not None:
            assert self.spec_policy is not None
            assert not any(inp.num_spec), "an overlapped step verifies no drafts"
            self._resolve_drafts()  # (drafts nobody verifies: their timings still count)
            self._refresh_draft_flags(sched.num_scheduled_tokens, inp.starts)
            self.spec_policy.skip_plan()
        # A decode step (no prefill chunk) of paused speculation feeds T(n) too, timed as
        # execute() times it: on the device with events read when its tokens arrive (CUDA), else
        # by the wall clock here (the CPU computes synchronously).
        timing = None
        b = len(inp.sample_rids)
        timed = (
            self.proposer is not None
            and b == len(sched.num_scheduled_tokens) == sched.total_num_scheduled_tokens
        )
        t0 = time.perf_counter()
        if timed and self.device.type == "cuda":
            timing = (b, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[1].record()
        logits = self._forward(inp)
        if logits is None:
            return None
        states = [(rid, self.requests[rid]) for rid in inp.sample_rids]
        rows = [self._sampler_row(st) for _, st in states]
        host = None
        if self.device.type == "cuda":  # (the sampler stores the ids there too, in stream order)
            host = self._token_out.take_ids(len(rows))
        tokens = self.sampler.sample_on_device(logits, rows, host)  # [R] int64
        self._token_out.queued()
        if timing is not None:
            timing[2].record()
        elif timed and tokens.device.type != "cuda":
            assert self.spec_policy is not None
            self.spec_policy.observe_target(b, time.perf_counter() - t0)
        for _, st in states:
            st.num_pending += 1
        self._prev_tokens = tokens
        self._prev_rows = {rid: (st, i) for i, (rid, st) in enumerate(states)}
        if host is None:
            return PendingStep(states=states, host_tokens=tokens, ready=None)
        ready = torch.cuda.Event()
        ready.record()
        return PendingStep(states=states, host_tokens=host, ready=ready, timing=timing)

    def resolve(self, step: PendingStep) -> RunnerOutput:
        """Wait for a launched step's tokens; append them to the requests the runner still holds
        (a request finished or preempted since its launch is dropped here, and reported as
        sampled all the same: the scheduler decides what a token still means)."""
        if step.ready is not None:
            step.ready.synchronize()
        if step.timing is not None and self.spec_policy is not None:
            n, start, end = step.timing
            self.spec_policy.observe_target(n, start.elapsed_time(end) / 1e3)
        out = RunnerOutput()
        for (rid, st), tok in zip(step.states, step.host_tokens.tolist()):
            out.sampled_token_ids[rid] = [tok]
            st.num_pending -= 1
            if self.requests.get(rid) is st:
                st.token_ids.append(tok)
                st.output_token_ids.append(tok)
        return out

    def _sampler_row(self, st: _RunnerRequest) -> SamplerRow:
        return SamplerRow(
            params=st.params,
            prompt_token_ids=_prompt(st),
            output_token_ids=st.output_token_ids,
            eos_token_ids=self.eos_token_ids,
            num_pending=st.num_pending,
        )

    def _sample(
        self,
        logits: torch.Tensor,
        rids: list[str],
        num_spec: list[int],
        out: RunnerOutput,
        queued: Callable[[], None] | None = None,
        best: list[int] | None = None,
    ) -> None:
        """Plain rows through the Sampler, draft-carrying requests through the verifier; append
        the resulting tokens to the runner's copy of each request. ``queued``: passed to the
        Sampler (called when the plain rows' sampling is queued); ``best``: every row's argmax,
        already on the host (a chained step: every row verifies greedy drafts)."""
        dev = self.device
        plain, plain_rows = [], []
        spec, spec_rows, spec_idx, q_parts = [], [], [], []
        row = 0
        for rid, k in zip(rids, num_spec):
            st = self.requests[rid]
            if k == 0:
                plain.append(rid)
                plain_rows.append(row)
            else:
                spec.append((rid, row, k))
                spec_idx.extend(range(row, row + k + 1))
                spec_rows.append(
                    SpecRow(
                        params=st.params,
                        prompt_token_ids=_prompt(st),
                        output_token_ids=st.output_token_ids,
                        eos_token_ids=self.eos_token_ids,
                        draft_token_ids=st.spec_token_ids[:k],
                    )
                )
                if st.draft_probs is not None:
                    q_parts.append((st.draft_probs[0], st.draft_probs[1][:k]))
            row += k + 1
        results: dict[str, tuple[list[int], list[Any] | None, int]] = {}
        if plain:
            rows = [self._sampler_row(self.requests[rid]) for rid in plain]
            # Without drafts in the step the rows are exactly the plain ones: no gather.
            plain_logits = (
                logits if len(plain_rows) == logits.shape[0] else logits[_index(plain_rows, dev)]
            )
            sampled = self.sampler(plain_logits, rows, queued)
            for i, rid in enumerate(plain):
                lp = sampled.logprobs[i]
                results[rid] = ([sampled.token_ids[i]], [lp] if lp is not None else None, 0)
        if spec:
            # Without plain rows in the step the rows are exactly the verified ones: no gather.
            spec_logits = logits if not plain else logits[_index(spec_idx, dev)]
            verified = self.rejection_sampler(
                spec_logits, spec_rows, _gather_rows(q_parts, dev), best
            )
            for (rid, row0, _k), toks, a in zip(spec, verified.token_ids, verified.num_accepted):
                st = self.requests[rid]
                lps = None
                if st.params.logprobs is not None:
                    lp_rows = _index(list(range(row0, row0 + len(toks))), dev)
                    lps = Sampler.token_logprobs(
                        logits[lp_rows], [self._sampler_row(st)] * len(toks), toks
                    )
                results[rid] = (toks, lps, a)
        for rid, k in zip(rids, num_spec):
            st = self.requests[rid]
            toks, lps, accepted = results[rid]
            st.token_ids.extend(toks)
            st.output_token_ids.extend(toks)
            out.sampled_token_ids[rid] = toks
            if lps is not None:
                out.logprobs[rid] = lps
            if self.proposer is None:
                continue
            st.spec_token_ids = []
            st.draft_probs = None
            st.pending = None
            # The draft fed itself d_1..d_{k-1}; those accepted are now verified tokens, so its KV
            # stays valid below the newest token (never fed yet) and up to the first rejection.
            st.draft_num_computed = min(st.draft_num_computed, len(st.token_ids) - 1)
            if k:
                out.spec_verified[rid] = (k, accepted)
                assert self.spec_policy is not None
                self.spec_policy.observe_verification(rid, k, accepted)

    def _finished_by_token(self, st: _RunnerRequest) -> bool:
        """The newest token ends the request (EOS / stop id): nothing to draft for it."""
        p = st.params
        if len(st.output_token_ids) <= p.min_tokens:
            return False
        tok = st.output_token_ids[-1]
        return (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids

    def _speculate(
        self,
        sched: SchedulerOutput,
        starts: dict[str, int],
        sample_rids: list[str],
        out: RunnerOutput,
        target_seconds: float,
        chain: _Chain | None = None,
    ) -> None:
        """Report the target step's time, plan the next step's drafts (unless ``chain`` planned
        them), run the draft (unless ``chain`` did), refresh flags."""
        assert self.proposer is not None and self.spec_policy is not None
        policy = self.spec_policy
        scheduled = sched.num_scheduled_tokens
        num_tokens = sched.total_num_scheduled_tokens
        sampled = set(sample_rids)
        chunk_tokens = (
            sum(n for rid, n in scheduled.items() if rid not in sampled)
            if len(sampled) < len(scheduled)
            else 0
        )
        if sample_rids and chunk_tokens == 0:
            # Sampling synchronized the device: the time is the step's. Only steady-state steps
            # (decode / verification shape, no prefill chunk) feed the cost model; a graph
            # replay costs what its padded batch costs.
            q = max(scheduled.values())
            if q <= self.num_speculative_tokens + 1:
                b = len(sample_rids)
                n = b * q if self._graph_covers(b, q) else num_tokens
                policy.observe_target(n, target_seconds)
        if chain is not None and chain.proposals is not None:
            self._adopt_chain(chain, out)
            self._refresh_draft_flags(scheduled, starts)
            return
        if chain is not None:
            plan = chain.plan
        else:
            candidates = []
            lags = []  # (verified tokens the draft has not run over, tokens it may still make)
            for rid in sample_rids:
                st = self.requests[rid]
                cap, lag = self._draft_room(st)
                if cap > 0 and not self._finished_by_token(st):
                    candidates.append((rid, cap))
                    lags.append(lag)
            b = len(sample_rids)
            steady = max(sched.num_active_requests, len(scheduled)) if chunk_tokens else None
            plan = policy.plan(
                candidates,
                num_requests=b,
                base_tokens=b + chunk_tokens,
                max_padded_k=self._max_padded_k(b) if chunk_tokens == 0 else 0,
                steady_requests=steady,
                steady_padded_k=self._max_padded_k(steady) if steady else 0,
                draft_lag=lags,
            )
        reqs = []
        for rid, k in plan.items():
            st = self.requests[rid]
            if chain is not None:  # planned before the verification's result
                k = min(k, self._drafts_left(st))
            if k > 0:
                reqs.append(self._draft_request(rid, st, len(st.token_ids), k))
        if reqs:
            # Speculation is on this step: keep chunked prefills' draft KV in step too, so their
            # first proposal does not start with a long draft prefill.
            if chunk_tokens:
                for rid, n in scheduled.items():
                    st = self.requests[rid]
                    end = starts[rid] + n
                    if rid not in sampled and st.draft_num_computed < end:
                        reqs.append(self._draft_request(rid, st, end, 0))
            proposals = self.proposer.propose(reqs)
            probs = proposals.probs
            for r in reqs:
                st = self.requests[r.request_id]
                # Draft KV now covers the fed tokens and the drafts it fed itself (all but d_k).
                st.draft_num_computed = r.end + max(r.num_spec - 1, 0)
                if r.num_spec:
                    st.spec_token_ids, st.pending = [], proposals
                    rows = proposals.prob_rows.get(r.request_id)
                    st.draft_probs = None if rows is None or probs is None else (probs, rows)
                    # The scheduler reads how many (its Request holds these placeholders); the
                    # next step's inputs take the ids from the device (_prepare).
                    out.spec_token_ids[r.request_id] = [DRAFT_PLACEHOLDER] * r.num_spec
            self._pending.append(proposals)
        self._refresh_draft_flags(scheduled, starts)

    # ---- chained proposals ---------------------------------------------------------------------
    # A synchronous step verifies drafts, then the draft proposes the next ones. Proposing after
    # the verification's result reaches the host leaves the device idle for the host's part of
    # it (the result's copy, bookkeeping, planning, input staging: 0.54 ms a step at batch 1 on
    # the H100, against a 12.5 ms cycle). A greedy proposal needs of that result only each
    # request's accepted count a, and its inputs are a's arithmetic (spec/proposal_graphs.py,
    # "Chained proposals"), so when every request of the step verifies greedy drafts the runner
    # plans the next proposal before the result is known, and queues it behind the verification
    # and its argmax: it takes a on the device. The plan is made one verification earlier than
    # otherwise (acceptance statistics one step older), and for the worst case of a: a
    # request's drafts must fit its blocks and its max_tokens with every draft accepted. Once
    # the result is on the host, a request that finished (EOS, a stop id, its length) drops its
    # drafts, and one with less room than planned keeps fewer (_adopt_chain).

    def _chain(
        self,
        sched: SchedulerOutput,
        inp: _StepInputs,
        logits: torch.Tensor,
        events: list[torch.cuda.Event] | None,
    ) -> _Chain | None:
        """Plan the next proposal and, where a graph replays it, queue it behind this step's
        verification (see above). None: the step does not qualify (the plan is made after the
        result, by _speculate). Records ``events[1]`` (the step's end) when it queues one."""
        assert self.proposer is not None and self.spec_policy is not None
        graphs = self.proposer.proposal_graphs
        rids, ks = inp.sample_rids, inp.num_spec
        if graphs is None or len(rids) != len(sched.num_scheduled_tokens) or not all(ks):
            return None  # (a prefill chunk, or a request without drafts, in the step)
        # Checked before planning, so that a chained plan is one a graph replays (the policy
        # prices and measures chained plans apart): a batch past the largest proposal graph,
        # a verification deeper than the graphs' k (the input kernel's bound), a block table
        # wider than theirs.
        if not graphs.sizes or len(rids) > graphs.sizes[-1] or max(ks) > graphs.max_k:
            return None
        pending = None
        for rid, k in zip(rids, ks):
            st = self.requests[rid]
            p = st.params
            if (
                len(st.block_ids) > graphs.width
                or st.pending is None
                or (pending is not None and st.pending is not pending)
                or p.temperature >= MIN_TEMPERATURE
                or reads_history(p)
                or len(st.output_token_ids) < p.min_tokens
                # forward 1 relies on the draft KV below L + k - 1 (the drafts it fed itself)
                or st.draft_num_computed < len(st.token_ids) + k - 1
            ):
                return None
            pending = st.pending
        assert pending is not None and pending.drafts is not None
        bs = self.block_size
        candidates, lags = [], []
        for rid, k in zip(rids, ks):
            st = self.requests[rid]
            # every draft accepted: the most tokens made, the deepest position written
            cap, (_, left) = self._draft_room(st, ahead=k + 1)
            room = min(len(st.block_ids) * bs, graphs.max_seq_len) - (len(st.token_ids) + k)
            candidates.append((rid, max(0, min(cap, graphs.max_k, room))))
            lags.append((2, left))
        b = len(rids)
        plan = self.spec_policy.plan(
            candidates,
            num_requests=b,
            base_tokens=b,
            max_padded_k=self._max_padded_k(b),
            steady_requests=None,
            steady_padded_k=0,
            draft_lag=lags,
            chained=True,
        )
        drafting = [(rid, k) for rid, k in plan.items() if k > 0]
        if not drafting:
            return _Chain(plan, [], None)
        kmax = max(k for _, k in drafting)  # (<= num_speculative_tokens = graphs.max_k)
        key = (next(s for s in graphs.sizes if s >= len(drafting)), 2, kmax)
        row_of = {}
        off = 0
        for rid, k in zip(rids, ks):
            row_of[rid] = off
            off += k + 1
        verified = dict(zip(rids, ks))
        reqs, params = [], []
        for rid, k in drafting:
            st = self.requests[rid]
            n = len(st.token_ids)
            # (as if no draft were accepted: the device moves it up by a, run_chained)
            reqs.append(self._draft_request(rid, st, n + 1, k, start=n - 1))
            base = pending.rows[rid] * pending.kmax
            params.append((st.token_ids[-1], row_of[rid], base, verified[rid]))
        # The argmax, its copy to the host and the step's end, queued before the draft.
        num_rows = logits.shape[0]
        host = None
        if self.device.type == "cuda":
            host = self._token_out.take_ids(num_rows)
        best = argmax_rows(logits, host)
        self._token_out.queued()
        ready = None
        if self.device.type == "cuda":
            if events is not None:
                events[1].record()
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = best
        proposals = self.proposer.propose_chained(reqs, key, params, best, pending.drafts)
        return _Chain(plan, reqs, proposals, host, ready)

    def _adopt_chain(self, chain: _Chain, out: RunnerOutput) -> None:
        """The chained proposal's drafts become the next step's, now that the verification's
        tokens are on the host (see the section comment)."""
        proposals = chain.proposals
        assert proposals is not None
        for r in chain.reqs:
            st = self.requests[r.request_id]
            # The draft fed x_{L'-1} (L' = len(token_ids) now) and d_1 .. d_{k-1} after it.
            st.draft_num_computed = len(st.token_ids) + r.num_spec - 1
            k = min(r.num_spec, self._drafts_left(st))
            if k > 0:
                st.spec_token_ids, st.pending, st.draft_probs = [], proposals, None
                out.spec_token_ids[r.request_id] = [DRAFT_PLACEHOLDER] * k
        self._pending.append(proposals)

    def _resolve_drafts(self) -> None:
        """Wait for the pending proposals' ids on the host (see DraftProposals): each request
        still waiting on one takes its drafts; the policy takes the draft timings."""
        if not self._pending:
            return
        policy = self.spec_policy
        assert policy is not None
        for proposals in self._pending:
            proposals.resolve()
            for rid, ids in proposals.token_ids.items():
                st = self.requests.get(rid)
                if st is not None and st.pending is proposals:
                    st.spec_token_ids, st.pending = ids, None
            for num_drafting, seconds in proposals.timings:
                policy.observe_draft(num_drafting, seconds)
            if proposals.catchup is not None:
                policy.observe_catchup(*proposals.catchup)
        self._pending = []

    def _drafts_left(self, st: _RunnerRequest) -> int:
        """What a plan made before this step's result may still give the request: nothing
        once its newest token ended it, else its room (_draft_room)."""
        return 0 if self._finished_by_token(st) else self._draft_room(st)[0]

    def _draft_room(self, st: _RunnerRequest, ahead: int = 0) -> tuple[int, tuple[int, int]]:
        """The most drafts the request may take next step (0: none), and its draft lag for the
        policy: (verified tokens the draft has not run over, tokens it may still generate).
        Tokens still in flight (overlapped steps) count as generated, and so do ``ahead`` more
        (a chained plan's worst case, _chain)."""
        n = len(st.token_ids) + st.num_pending + ahead
        done = len(st.output_token_ids) + st.num_pending + ahead
        left = max_num_spec_tokens(n, done, st.params.max_tokens, self.max_model_len)
        cap = max(0, min(self.num_speculative_tokens, left))
        return cap, (n - st.draft_num_computed, left + 1)

    def speculation_paused(
        self, running: Sequence[Request], num_requests: int, prefill: bool
    ) -> bool:
        """Whether the next step (of ``num_requests`` requests: ``running``, the rest waiting;
        ``prefill``: it carries prompt chunks) may skip planning: the policy's decision
        (adaptive.py, "Pausing" and "Dry plans"), with the candidates a plan would get as
        ``_speculate`` builds them, from the host's view (a request with nothing left to draft
        is a candidate with cap 0). The caller checks that no request holds drafts."""
        assert self.spec_policy is not None

        def batch() -> tuple[list[tuple[str, int]], list[tuple[int, int]]]:
            candidates, lags = [], []
            for req in running:
                st = self.requests.get(req.request_id)
                if st is None:  # not seen by the runner yet (priced as a new request)
                    continue
                cap, lag = self._draft_room(st)
                candidates.append((req.request_id, cap))
                lags.append(lag)
            return candidates, lags

        return self.spec_policy.speculation_paused(
            num_requests, batch, self._max_padded_k(num_requests), prefill
        )

    def _graph_covers(self, num_seqs: int, q: int) -> bool:
        """A step of ``num_seqs`` requests with at most q tokens each replays a graph."""
        sizes = self.graphs.sizes_by_q.get(q) if self.graphs is not None else None
        return bool(sizes) and num_seqs <= sizes[-1]

    def _max_padded_k(self, num_seqs: int) -> int:
        """Most drafts per request for which a verification of ``num_seqs`` requests replays a
        padded graph (0: none)."""
        k = self.num_speculative_tokens
        while k > 0 and not self._graph_covers(num_seqs, k + 1):
            k -= 1
        return k

    def _draft_request(
        self, rid: str, st: _RunnerRequest, end: int, k: int, start: int | None = None
    ) -> DraftRequest:
        """Feed token_ids[start:end] (``start``: by default where the draft's KV stops)."""
        # Imported here: the proposer module builds its batches with this module's helpers.
        from rayfleet.replicas.spec.proposer import DraftRequest

        return DraftRequest(
            request_id=rid,
            token_ids=st.token_ids,
            num_prompt_tokens=st.num_prompt_tokens,
            output_token_ids=st.output_token_ids,
            block_ids=st.block_ids,
            params=st.params,
            start=st.draft_num_computed if start is None else start,
            end=end,
            num_spec=k,
        )

    # ---- draft KV validity per block -----------------------------------------------------------
    # Prefix-cache hits hand a request blocks another request computed. Their target KV is valid
    # by construction; their draft KV is valid only if the draft ran over those tokens (it does
    # not while speculation is off for a request or a step). _draft_block_valid[b] records "the
    # draft KV of all block_size slots of b belongs to the verified tokens the block holds",
    # i.e. (i + 1) * block_size <= dv for the owner's block i, dv = min(draft_num_computed,
    # verified tokens). Read when a request (new or resumed) adopts hit blocks. Kept right by
    # recomputing it, at the end of every step, for the blocks whose answer can have changed:
    # those the target wrote, and those between the owner's previous and current dv. Blocks no
    # target has written since their last reallocation may hold a stale True, but cannot be hit:
    # a block is hashed only in the step the target writes its last verified token.

    def _valid_draft_prefix(self, block_ids: list[int], num_computed: int) -> int:
        bs = self.block_size
        n = 0
        while n < num_computed // bs and self._draft_block_valid[block_ids[n]]:
            n += 1
        return n * bs

    def _refresh_draft_flags(self, scheduled: dict[str, int], starts: dict[str, int]) -> None:
        """For each request of the step (``scheduled[rid]`` tokens from ``starts[rid]``):
        recompute the flags of the blocks the target wrote this step (positions
        [start, start + n)) and of those the change of dv moved across."""
        bs = self.block_size
        valid = self._draft_block_valid
        for rid, n in scheduled.items():
            st = self.requests[rid]
            written_from, written_to = starts[rid], starts[rid] + n
            dv = min(st.draft_num_computed, len(st.token_ids))
            if n == 1 and dv == st.flags_dv:
                # The common case, a decode step that moved no dv (every step while speculation
                # is paused, where this runs on the host's critical path): one block to flag.
                i = written_from // bs
                if i < len(st.block_ids):
                    valid[st.block_ids[i]] = (i + 1) * bs <= dv
                continue
            lo, hi = sorted((st.flags_dv, dv))
            n_blocks = len(st.block_ids)
            for first, end in (
                (lo // bs, hi // bs + 1),
                (written_from // bs, -(-written_to // bs)),
            ):
                for i in range(first, min(end, n_blocks)):
                    valid[st.block_ids[i]] = (i + 1) * bs <= dv
            st.flags_dv = dv


def _prompt(st: _RunnerRequest) -> list[int] | tuple[()]:
    """The prompt for a SamplerRow: only the repetition penalty reads it (spare the copy)."""
    return st.token_ids[: st.num_prompt_tokens] if st.params.repetition_penalty != 1.0 else ()


def _gather_rows(
    parts: list[tuple[torch.Tensor, list[int]]], device: torch.device
) -> torch.Tensor | None:
    """Concatenate rows of (tensor, row indices) parts; one gather when they share a tensor."""
    if not parts:
        return None
    first = parts[0][0]
    if all(t is first for t, _ in parts):
        return first[_index([r for _, rows in parts for r in rows], device)]
    return torch.cat([t[_index(rows, device)] for t, rows in parts])
