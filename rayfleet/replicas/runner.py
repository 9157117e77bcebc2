"""ModelRunner: SchedulerOutput -> batch tensors -> forward -> sampled token ids.

The runner keeps, per request it has been sent, a copy of the verified token ids and the block
table; each step the scheduler sends only what changed (see scheduler.NewRequestData /
CachedRequestData). Tokens to compute this step for a request are
``(token_ids + draft_ids)[num_computed : num_computed + n]``; if that reaches the end of the
verified tokens, the runner samples the next token from the last position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rayfleet import kernels
from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.engine.scheduler import RunnerOutput, SchedulerOutput
from rayfleet.replicas.model.forward import ForwardBatch
from rayfleet.replicas.sampler import Sampler, SamplerRow


@dataclass
class _RunnerRequest:
    token_ids: list[int]  # prompt + verified outputs
    num_prompt_tokens: int
    block_ids: list[int]
    params: Any
    # Output ids as a list view for the sampler's penalties (kept in sync with token_ids).
    output_token_ids: list[int] = field(default_factory=list)


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
    ) -> None:
        self.model = model
        self.arch = model.arch
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.attention = kernels.get("paged_attention", attention_backend)
        self.write_kv = kernels.get(
            "write_kv",
            attention_backend if attention_backend in kernels.backends("write_kv") else None,
        )
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(seed=seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.requests: dict[str, _RunnerRequest] = {}

    # ---- KV cache ------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(
            self.arch.num_layers,
            self.block_size,
            self.arch.num_kv_heads,
            self.arch.head_dim,
            self.dtype,
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        # Zeroed, not empty: padded/masked positions are multiplied by zero weights, and stale
        # NaN bit patterns in never-written slots would turn 0 * NaN into NaN.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.arch.num_layers)
        ]
        self.num_blocks = num_blocks

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
            slots.extend(
                row[p // self.block_size] * self.block_size + p % self.block_size for p in range(n)
            )
            qsl.append(qsl[-1] + n)
            table.append(row)
        meta = self._metadata(slots, qsl, per_seq, table)
        ids = torch.randint(0, self.arch.vocab_size, (n_tok,), device=self.device)
        hidden = self.model(ids, torch.tensor(positions, device=self.device), self._batch(meta))
        self.model.compute_logits(hidden[torch.tensor(qsl[1:], device=self.device) - 1])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        kv_profile = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
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
        for new in sched.new_requests:
            self.requests[new.request_id] = _RunnerRequest(
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids),
                block_ids=list(new.block_ids),
                params=new.sampling_params,
                output_token_ids=list(new.output_token_ids),
            )
        for cached in sched.cached_requests:
            st = self.requests[cached.request_id]
            if cached.num_truncated_blocks:
                del st.block_ids[len(st.block_ids) - cached.num_truncated_blocks :]
            st.block_ids.extend(cached.new_block_ids)

    def _start_positions(self, sched: SchedulerOutput) -> dict[str, int]:
        starts = {r.request_id: r.num_computed_tokens for r in sched.new_requests}
        starts.update({r.request_id: r.num_computed_tokens for r in sched.cached_requests})
        return starts

    def _metadata(
        self, slots: list[int], qsl: list[int], seq_lens: list[int], tables: list[list[int]]
    ) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seq_lens))),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )

    def _batch(self, meta: AttentionMetadata) -> ForwardBatch:
        return ForwardBatch(
            meta=meta, kv_caches=self.kv_caches, attention=self.attention, write_kv=self.write_kv
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return RunnerOutput()
        starts = self._start_positions(sched)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rids: list[str] = []
        logits_idx: list[int] = []
        for rid, n in sched.num_scheduled_tokens.items():
            st = self.requests[rid]
            start = starts[rid]
            seq = st.token_ids + sched.spec_token_ids.get(rid, [])
            input_ids.extend(seq[start : start + n])
            positions.extend(range(start, start + n))
            table = st.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if start + n >= len(st.token_ids):
                sample_rids.append(rid)
                logits_idx.append(qsl[-1] - 1)
        meta = self._metadata(slots, qsl, seq_lens, tables)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
            self._batch(meta),
        )
        out = RunnerOutput()
        if not sample_rids:
            return out
        logits = self.model.compute_logits(
            hidden[torch.tensor(logits_idx, dtype=torch.int64, device=self.device)]
        )
        rows = []
        for rid in sample_rids:
            st = self.requests[rid]
            rows.append(
                SamplerRow(
                    params=st.params,
                    prompt_token_ids=st.token_ids[: st.num_prompt_tokens],
                    output_token_ids=st.output_token_ids,
                    eos_token_ids=self.eos_token_ids,
                )
            )
        sampled = self.sampler(logits, rows)
        for i, rid in enumerate(sample_rids):
            tok = sampled.token_ids[i]
            st = self.requests[rid]
            st.token_ids.append(tok)
            st.output_token_ids.append(tok)
            out.sampled_token_ids[rid] = [tok]
            if sampled.logprobs[i] is not None:
                out.logprobs[rid] = [sampled.logprobs[i]]
        return out
