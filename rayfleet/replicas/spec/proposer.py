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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rayfleet.replicas.cuda_graphs import DecodeGraphs
from rayfleet.replicas.model.forward import ForwardBatch
from rayfleet.replicas.runner import (
    allocate_kv_tensors,
    build_attention_metadata,
    kv_cache_bytes_per_block,
    slot_mapping,
)
from rayfleet.replicas.sampler import MIN_TEMPERATURE, Sampler, SamplerRow
from rayfleet.replicas.spec.rejection import DRAFT_STREAM, HistoryView, stream_seed
from rayfleet.sampling_params import SamplingParams


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
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    # [rows, V] distributions the sampled requests' drafts were drawn from (None: all greedy).
    probs: torch.Tensor | None = None
    prob_rows: dict[str, list[int]] = field(default_factory=dict)
    # (tokens in the forward, seconds) of each draft forward, for the cost model.
    timings: list[tuple[int, float]] = field(default_factory=list)


class DraftProposer:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        attention,
        write_kv,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        rope_and_write_kv=None,
    ) -> None:
        self.model = model
        self.arch = model.arch
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.attention = attention
        self.write_kv = write_kv
        self.rope_and_write_kv = rope_and_write_kv
        self.eos_token_ids = eos_token_ids
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Optional CUDA graphs for the single-token draft forwards (see enable_cuda_graphs).
        self.graphs = None
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed ^ DRAFT_STREAM)
        self._row_gen = torch.Generator(device=device)

    @property
    def bytes_per_block(self) -> int:
        a = self.arch
        return kv_cache_bytes_per_block(
            a.num_layers, self.block_size, a.num_kv_heads, a.head_dim, self.dtype
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_tensors(
            self.arch, num_blocks, self.block_size, self.dtype, self.device
        )

    def enable_cuda_graphs(
        self, capture_sizes: list[int], max_blocks_per_seq: int, max_seq_len: int
    ) -> None:
        """Capture decode graphs for the draft (CUDA; after allocate_kv_cache). Every proposal
        forward after the first feeds one token per request: exactly a decode step."""

        self.graphs = DecodeGraphs.capture_for(
            self,
            capture_sizes=capture_sizes,
            max_blocks_per_seq=max_blocks_per_seq,
            max_seq_len=max_seq_len,
        )

    def _forward(
        self, input_ids: list[int], positions: list[int], spans: list[tuple[list[int], int, int]]
    ) -> torch.Tensor:
        """Draft forward over the concatenated spans (block_ids, start, end); returns the hidden
        state of each span's last token [num_spans, hidden]."""
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for block_ids, start, end in spans:
            slots.extend(slot_mapping(block_ids, start, end, self.block_size))
            qsl.append(qsl[-1] + end - start)
            seq_lens.append(end)
            tables.append(block_ids)
        meta = build_attention_metadata(slots, qsl, seq_lens, tables, self.device)
        batch = ForwardBatch(
            meta=meta,
            kv_caches=self.kv_caches,
            attention=self.attention,
            write_kv=self.write_kv,
            rope_and_write_kv=self.rope_and_write_kv,
        )
        dev = self.device
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        if self.graphs is not None and self.graphs.can_run(meta, len(input_ids)):
            hidden = self.graphs.run(ids, pos, meta)
        else:
            hidden = self.model(ids, pos, batch)
        last = torch.tensor(qsl[1:], dtype=torch.int64, device=dev) - 1
        return hidden[last]

    @torch.inference_mode()
    def propose(self, reqs: list[DraftRequest]) -> DraftProposals:
        out = DraftProposals()
        if not reqs:
            return out
        t0 = time.perf_counter()
        input_ids: list[int] = []
        positions: list[int] = []
        spans = []
        for r in reqs:
            if not 0 <= r.start < r.end <= len(r.token_ids):
                raise ValueError(f"{r.request_id}: bad draft span [{r.start}, {r.end})")
            input_ids.extend(r.token_ids[r.start : r.end])
            positions.extend(range(r.start, r.end))
            spans.append((r.block_ids, r.start, r.end))
        last_hidden = self._forward(input_ids, positions, spans)
        active = [i for i, r in enumerate(reqs) if r.num_spec > 0]
        drafts: dict[int, list[int]] = {i: [] for i in active}
        prob_chunks: list[torch.Tensor] = []
        num_prob_rows = 0
        step = 0
        while active:
            if step > 0:
                t0 = time.perf_counter()
                # Feed each request's newest draft at the position after its previous token.
                ids, pos, sp = [], [], []
                for i in active:
                    r = reqs[i]
                    p = r.end + step - 1
                    ids.append(drafts[i][-1])
                    pos.append(p)
                    sp.append((r.block_ids, p, p + 1))
                last_hidden = self._forward(ids, pos, sp)
                rows_hidden = last_hidden
            else:
                rows_hidden = last_hidden[torch.tensor(active, device=self.device)]
            logits = self.model.compute_logits(rows_hidden)  # [A, V] float32
            toks, probs, sampled = self._sample(logits, [reqs[i] for i in active], drafts, active)
            if probs is not None:
                prob_chunks.append(probs)
                for j, a in enumerate(sampled):
                    out.prob_rows.setdefault(reqs[active[a]].request_id, []).append(
                        num_prob_rows + j
                    )
                num_prob_rows += probs.shape[0]
            for a, i in enumerate(active):
                drafts[i].append(toks[a])
            num_tokens = len(input_ids) if step == 0 else len(active)
            out.timings.append((num_tokens, time.perf_counter() - t0))
            step += 1
            active = [i for i in active if reqs[i].num_spec > step]
        if step == 0:  # only KV filling: make the timing cover the forward
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            out.timings.append((len(input_ids), time.perf_counter() - t0))
        for i, d in drafts.items():
            out.token_ids[reqs[i].request_id] = d
        if prob_chunks:
            out.probs = torch.cat(prob_chunks) if len(prob_chunks) > 1 else prob_chunks[0]
        return out

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[DraftRequest],
        drafts: dict[int, list[int]],
        active: list[int],
    ) -> tuple[list[int], torch.Tensor | None, list[int]]:
        """Draft tokens for one position of each active request, through the sampler's transform
        (penalties see the drafts proposed so far). Returns (tokens, probs of the sampled rows,
        which of the rows were sampled)."""
        rows = [
            SamplerRow(
                params=r.params,
                # Only the repetition penalty reads the prompt: skip copying it otherwise.
                prompt_token_ids=r.token_ids[: r.num_prompt_tokens]
                if r.params.repetition_penalty != 1.0
                else (),
                output_token_ids=HistoryView(r.output_token_ids, drafts[i]),
                eos_token_ids=self.eos_token_ids,
            )
            for r, i in zip(reqs, active)
        ]
        x = Sampler.apply_penalties(logits, rows)
        dev = self.device
        tokens = torch.empty(len(rows), dtype=torch.long, device=dev)
        greedy = [j for j, r in enumerate(rows) if r.params.temperature < MIN_TEMPERATURE]
        sampled = [j for j, r in enumerate(rows) if r.params.temperature >= MIN_TEMPERATURE]
        probs = None
        if greedy:
            g = torch.tensor(greedy, dtype=torch.long, device=dev)
            tokens[g] = x[g].argmax(dim=-1)
        if sampled:
            s_idx = torch.tensor(sampled, dtype=torch.long, device=dev)
            sub = [rows[j] for j in sampled]
            probs = Sampler.sampling_probs(x[s_idx], sub)  # [S, V]
            e = torch.empty_like(probs)
            unseeded = [n for n, j in enumerate(sampled) if rows[j].params.seed is None]
            if unseeded:
                noise = torch.empty(len(unseeded), probs.shape[1], device=dev)
                e[torch.tensor(unseeded, device=dev)] = noise.exponential_(generator=self._gen)
            for n, j in enumerate(sampled):
                seed = rows[j].params.seed
                if seed is not None:
                    # The draft token at output position i of a seeded request: its own stream.
                    self._row_gen.manual_seed(
                        stream_seed(seed, len(rows[j].output_token_ids), DRAFT_STREAM)
                    )
                    e[n].exponential_(generator=self._row_gen)
            e.clamp_(min=torch.finfo(e.dtype).tiny)
            tokens[s_idx] = (probs / e).argmax(dim=-1)
        return tokens.tolist(), probs, sampled
