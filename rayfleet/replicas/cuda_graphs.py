"""CUDA graphs for decode steps: one graph per padded batch size, all sharing one memory pool.

A decode step (every request computes exactly one token) has the same kernels and shapes for a
given batch size, so its forward is captured once per size in ``capture_sizes`` (largest first,
so smaller graphs reuse the pool) and replayed: the step's inputs are copied into static buffers,
padded rows point at the null block (slot 0), and the first ``num_seqs`` rows of the captured
output are returned. Anything else (prefill chunks, multi-token queries, batches larger than the
largest graph) runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.model.forward import ForwardBatch

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs and max_num_seqs > 8:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attention: Callable[..., torch.Tensor],
        write_kv: Callable[..., None],
        *,
        rope_and_write_kv: Callable[..., torch.Tensor] | None = None,
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attention = attention
        self.write_kv = write_kv
        self.rope_and_write_kv = rope_and_write_kv
        self.sizes = sorted(capture_sizes)
        self.max_size = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        n = self.max_size
        # Static inputs, shared by every graph (a graph of size b reads the first b rows).
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0

    @classmethod
    def capture_for(
        cls, owner, *, capture_sizes: list[int], max_blocks_per_seq: int, max_seq_len: int
    ) -> DecodeGraphs:
        """Capture graphs of ``owner``'s model over its KV caches. ``owner`` is a ModelRunner or
        a DraftProposer: anything with model, kv_caches, attention, write_kv, rope_and_write_kv
        and device."""
        graphs = cls(
            owner.model,
            owner.kv_caches,
            owner.attention,
            owner.write_kv,
            rope_and_write_kv=owner.rope_and_write_kv,
            capture_sizes=capture_sizes,
            max_blocks_per_seq=max_blocks_per_seq,
            max_seq_len=max_seq_len,
            device=owner.device,
        )
        graphs.capture()
        return graphs

    def _batch(self, b: int) -> ForwardBatch:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            max_query_len=1,
            # Host-side bound for kernels' launch shapes: fixed at capture, so it must cover any
            # context a replay can see.
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[self.max_seq_len] * b,
        )
        return ForwardBatch(
            meta=meta,
            kv_caches=self.kv_caches,
            attention=self.attention,
            write_kv=self.write_kv,
            rope_and_write_kv=self.rope_and_write_kv,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.sizes):
            batch = self._batch(b)
            args = (self.input_ids[:b], self.positions[:b], batch)
            # Warm-up outside the graph: autotuning, lazy init and workspace allocation.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(*args)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.memory_bytes = max(free_before - torch.cuda.mem_get_info()[0], 0)
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) using %.1f MiB",
            len(self.graphs), self.sizes[0], self.max_size, self.memory_bytes / 2**20,
        )

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return (
            bool(self.graphs)
            and meta.max_query_len == 1
            and num_tokens == meta.num_seqs <= self.max_size
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [num_seqs, hidden]
        b = meta.num_seqs
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(meta.block_tables)
        if size > b:
            # Padding rows: write into the null block, attend to one token of it.
            self.slot_mapping[b:size].zero_()
            self.seq_lens[b:size].fill_(1)
            self.positions[b:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:b]
