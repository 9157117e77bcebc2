"""CUDA graphs for steps in which every request computes at most q tokens: one graph per
(padded batch size, q), all sharing one memory pool.

q = 1 is a plain decode step; q = 1 + k is a speculative verification in which requests carry up
to k drafts (and the draft model's first proposal forward feeds 1-3 tokens per request). Such a
step has the same kernels and shapes for a given (batch size, q), so its forward is captured once
per key (largest first, so smaller graphs reuse the pool) and replayed: the step's varlen inputs
are scattered into static buffers laid out as ``size`` slots of q rows each (``size`` the smallest
captured batch size >= the step's), and the real rows of the output are gathered back in the
step's order. A step whose requests all compute exactly q tokens needs no scatter.

    varlen step (3 requests, q = 3):   a0 a1 a2 | b0 | c0 c1
    padded layout (size 4):            a0 a1 a2 | b0 .  . | c0 c1 . | .  .  .
                                       (. = padding row: KV slot 0, i.e. the null block)

Invariants that make padding invisible to real rows:

- a request with n < q tokens keeps its real rows first and gets seq_len = start + q, so real row
  j still sits at position start + j (the attention kernel derives positions from seq_len and the
  query length); attention is causal, so real rows never attend to the padding rows behind them;
- padding rows write their K/V into slot 0 only (block 0 is never allocated to a request), and
  what they read (null or stale blocks: finite values) only reaches their own rows, which nobody
  reads;
- padding requests (slots past the step's batch) are q padding rows with seq_len q.

Short prefills round up. ``prefill_query_lens`` are further q's (powers of two from
``PREFILL_MIN_Q``; ``prefill_query_lens``) captured for the sizes with size * q <=
``max_prefill_tokens``: a step whose longest query fits no exact q replays the smallest of them
that holds it, by the same layout, when the padding at most doubles its tokens (size * q <=
2 * tokens + q) and adds at most ``PREFILL_MAX_PADDING`` rows. That takes a short prompt's
prefill, or the draft's catch-up over a prompt, off the host's eager launch path: at batch 1
each costs the host more (a launch per kernel) than the device needs for it.

Anything else (long prefill chunks, steps padding past that bound, batches larger than the
largest graph of their q) runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from rayfleet import kernels
from rayfleet.kernels.attention_ref import AttentionMetadata
from rayfleet.replicas.model.forward import AttentionKernels, ForwardBatch
from rayfleet.replicas.transfer import index_tensor, to_device

logger = logging.getLogger(__name__)


# Smallest bucket of the short-prefill graphs: query lengths below it are decode and
# verification shapes, captured exactly.
PREFILL_MIN_Q = 16
# Most padding rows a step may take to replay a short-prefill graph. A padding row costs what a
# real one does, and a prefill of a few hundred tokens is compute-bound on an 8B target, so
# padding trades against the host's eager launch time (milliseconds) only up to a few hundred
# rows: a 513-token prompt runs eagerly rather than as 1024. (A bound from that reasoning, not
# from a measured crossover.)
PREFILL_MAX_PADDING = 256


def prefill_query_lens(max_tokens: int, smallest: int = PREFILL_MIN_Q) -> list[int]:
    """The short-prefill buckets: powers of two from ``smallest`` up to ``max_tokens``."""
    lens = []
    q = smallest
    while q <= max_tokens:
        lens.append(q)
        q *= 2
    return lens


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs and max_num_seqs > 8:
        sizes.append(max_num_seqs)
    return sizes


K = TypeVar("K", bound=Hashable)


def capture_graphs(
    keys: Sequence[K],
    body: Callable[[K], object],
    prepare: Callable[[K], object],
    warm_key: Callable[[K], Hashable] = lambda key: key,
) -> tuple[dict[K, torch.cuda.CUDAGraph], int]:
    """One CUDA graph of ``body(key)`` per key, in ``keys`` order, all in one memory pool (the
    largest first lets the others reuse its blocks). ``prepare(key)`` sets the static inputs to
    values safe to run (every KV write to the null block) before a key's warm-up and capture,
    and again before its upload. Keys with the same ``warm_key`` share one warm-up (on a side
    stream: Triton compilation, lazy init, workspace allocation outside the graph). Each graph
    is launched once after capture: a graph's first launch also uploads it to the device, a
    cost that would otherwise land on the first step replaying it, and on the cost model's
    first sample of that step's size (spec/adaptive.py). Returns the graphs and the device
    bytes they took."""
    free_before = torch.cuda.mem_get_info()[0]
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    graphs: dict[K, torch.cuda.CUDAGraph] = {}
    warm: set[Hashable] = set()
    for key in keys:
        prepare(key)
        if warm_key(key) not in warm:
            warm.add(warm_key(key))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                body(key)
            torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body(key)
        graphs[key] = graph
    for key, graph in graphs.items():
        prepare(key)
        graph.replay()
    torch.cuda.synchronize()
    return graphs, max(free_before - torch.cuda.mem_get_info()[0], 0)


def static_metadata(
    slot_mapping: torch.Tensor,  # [b * q] int64
    query_start_loc: torch.Tensor,  # [b + 1] int32: 0, q, 2q, ...
    seq_lens: torch.Tensor,  # [b] int32
    block_tables: torch.Tensor,  # [b, max_blocks] int32
    q: int,
    max_seq_len: int,
    seq_lens_cpu: list[int] | None = None,
) -> AttentionMetadata:
    """Attention metadata of b requests computing q tokens each, over a graph's static buffers
    (DecodeGraphs, spec/proposal_graphs.py)."""
    b = seq_lens.shape[0]
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=q,
        # Host-side bound for kernels' launch shapes: fixed at capture, so it must cover any
        # context a replay can see.
        max_seq_len=max_seq_len,
        query_start_loc_cpu=list(range(0, b * q + 1, q)),
        # Graphs need no host copy (device-side kernels); emulation passes the real one for the
        # torch reference backend.
        seq_lens_cpu=seq_lens_cpu or [max_seq_len] * b,
    )


@dataclass
class UniformQueryLayout:
    """Where a varlen step's tokens go in the padded [size * q] layout."""

    q: int
    size: int
    dest: list[int]  # padded row of each of the step's tokens, in the step's (varlen) order
    seq_lens: list[int]  # [size]: start + q per real request, q per padding request


def uniform_query_layout(
    query_start_loc: Sequence[int], seq_lens: Sequence[int], q: int, size: int
) -> UniformQueryLayout:
    """Request i (n_i = query_start_loc[i+1] - query_start_loc[i] tokens, 1 <= n_i <= q, context
    seq_lens[i] after the step) occupies padded rows [i*q, i*q + q): its tokens first, padding
    after; see the module docstring for why real rows are unaffected."""
    b = len(seq_lens)
    if b > size:
        raise ValueError(f"{b} requests do not fit a graph of batch {size}")
    dest: list[int] = []
    padded: list[int] = []
    for i in range(b):
        n = query_start_loc[i + 1] - query_start_loc[i]
        if not 1 <= n <= q:
            raise ValueError(f"request {i} computes {n} tokens; a q={q} layout needs 1..{q}")
        dest.extend(range(i * q, i * q + n))
        padded.append(seq_lens[i] - n + q)
    padded.extend([q] * (size - b))
    return UniformQueryLayout(q=q, size=size, dest=dest, seq_lens=padded)


class DecodeGraphs:
    """Graphs keyed by (padded batch size, query length q); see the module docstring.

    ``capture_sizes`` are the batch sizes captured for q = 1; each q in ``query_lens`` (> 1) is
    captured for the sizes with size * q <= ``max_multi_query_tokens`` (None: all of them), and
    each q in ``prefill_query_lens`` for the sizes with size * q <= ``max_prefill_tokens``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_kernels: AttentionKernels,
        *,
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        device: torch.device,
        query_lens: Sequence[int] = (1,),
        max_multi_query_tokens: int | None = None,
        prefill_query_lens: Sequence[int] = (),
        max_prefill_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attn_kernels = attn_kernels
        self.device = device
        self.sizes = sorted(capture_sizes)
        self.max_size = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        # q -> captured batch sizes, ascending.
        self.sizes_by_q: dict[int, list[int]] = {}
        for q in sorted(set(query_lens) | {1}):
            cap = max_multi_query_tokens if q > 1 and max_multi_query_tokens else None
            sizes = [s for s in self.sizes if cap is None or s * q <= cap]
            if sizes:
                self.sizes_by_q[q] = sizes
        # q -> batch sizes of the short-prefill buckets (see the module docstring), ascending.
        self.prefill_sizes_by_q: dict[int, list[int]] = {}
        for q in sorted(set(prefill_query_lens) - set(self.sizes_by_q)):
            if q >= 2 * max_seq_len:  # holds nothing a smaller bucket does not
                continue
            sizes = [s for s in self.sizes if s * q <= max_prefill_tokens]
            if sizes:
                self.sizes_by_q[q] = self.prefill_sizes_by_q[q] = sizes
        self.keys = sorted(
            ((s, q) for q, sizes in self.sizes_by_q.items() for s in sizes),
            key=lambda k: (k[0] * k[1], k[1]),
            reverse=True,
        )
        n_tok = max(s * q for s, q in self.keys)
        n = self.max_size
        # Static inputs shared by every graph: graph (b, q) reads the first b*q token rows and
        # the first b request rows.
        self.input_ids = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        # A short prefill's padding rows extend its context by up to a bucket's q (they attend,
        # for nobody, over table entries past the request's own: stale block ids, never out of
        # bounds), so the table has room for that much more past max_seq_len.
        block_size = kv_caches[0][0].shape[1] if kv_caches else 1
        extra = -(-max(self.prefill_sizes_by_q, default=0) // block_size)
        self.block_tables = torch.zeros(
            n, max_blocks_per_seq + extra, dtype=torch.int32, device=device
        )
        self.query_start_loc = {
            q: torch.arange(n + 1, dtype=torch.int32, device=device) * q for q in self.sizes_by_q
        }
        # One output buffer for every graph (each copies its result into the first b*q rows),
        # so the pool holds only scratch memory, reusable across captures.
        self.output = torch.zeros(
            n_tok, model.arch.hidden_size, dtype=next(model.parameters()).dtype, device=device
        )
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        # Tests on CPU: run the captured-shape forward eagerly over the same static buffers.
        self.emulated = False
        self._stage_op = kernels.get_or_default(
            "stage_step_inputs", "triton" if device.type == "cuda" else None
        )

    @classmethod
    def capture_for(
        cls,
        owner,
        *,
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        query_lens: Sequence[int] = (1,),
        max_multi_query_tokens: int | None = None,
        prefill_query_lens: Sequence[int] = (),
        max_prefill_tokens: int = 0,
        emulate: bool = False,
    ) -> DecodeGraphs:
        """Capture graphs of ``owner``'s model over its KV caches. ``owner`` is a ModelRunner or
        a DraftProposer: anything with model, kv_caches, attn_kernels and device. ``emulate``:
        capture nothing and replay eagerly (CPU tests of the padding logic)."""
        graphs = cls(
            owner.model,
            owner.kv_caches,
            owner.attn_kernels,
            capture_sizes=capture_sizes,
            max_blocks_per_seq=max_blocks_per_seq,
            max_seq_len=max_seq_len,
            device=owner.device,
            query_lens=query_lens,
            max_multi_query_tokens=max_multi_query_tokens,
            prefill_query_lens=prefill_query_lens,
            max_prefill_tokens=max_prefill_tokens,
        )
        if emulate:
            graphs.emulated = True
        else:
            graphs.capture()
        return graphs

    def _batch(self, b: int, q: int, seq_lens_cpu: list[int] | None = None) -> ForwardBatch:
        meta = static_metadata(
            self.slot_mapping[: b * q],
            self.query_start_loc[q][: b + 1],
            self.seq_lens[:b],
            self.block_tables[:b],
            q,
            self._padded_max_seq_len(q),
            seq_lens_cpu,
        )
        return self.attn_kernels.batch(meta, self.kv_caches)

    def _forward(
        self, b: int, q: int, seq_lens_cpu: list[int] | None = None
    ) -> torch.Tensor:  # [b * q, hidden]
        n = b * q
        return self.model(self.input_ids[:n], self.positions[:n], self._batch(b, q, seq_lens_cpu))

    @torch.inference_mode()
    def capture(self) -> None:
        def body(key: tuple[int, int]) -> None:
            b, q = key
            self.output[: b * q].copy_(self._forward(b, q))

        def prepare(key: tuple[int, int]) -> None:
            self.seq_lens.fill_(key[1])  # sane contexts (replays set their own); zero slots

        graphs, self.memory_bytes = capture_graphs(list(self.keys), body, prepare)
        self.graphs.update(graphs)
        logger.info(
            "captured %d CUDA graphs (batch %d..%d, query lengths %s) using %.1f MiB",
            len(self.graphs),
            self.sizes[0],
            self.max_size,
            sorted(self.sizes_by_q),
            self.memory_bytes / 2**20,
        )

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether ``run`` replays a graph for this step (a short prefill may round up)."""
        return self._graph_key(meta, num_tokens) is not None

    def _graph_key(self, meta: AttentionMetadata, num_tokens: int) -> tuple[int, int] | None:
        return self.graph_for(
            meta.num_seqs,
            meta.max_query_len,
            num_tokens,
            meta.block_tables.shape[1],
            meta.max_seq_len,
            round_up=True,
        )

    def fits(
        self, num_seqs: int, q: int, num_tokens: int, table_width: int, max_seq_len: int
    ) -> bool:
        """Whether a step of ``num_seqs`` requests computing at most ``q`` tokens each
        (``num_tokens`` in all) replays the graph of exactly that q (``stage``)."""
        return self.graph_for(num_seqs, q, num_tokens, table_width, max_seq_len) is not None

    def graph_for(
        self,
        num_seqs: int,
        q: int,
        num_tokens: int,
        table_width: int,
        max_seq_len: int,
        *,
        round_up: bool = False,
    ) -> tuple[int, int] | None:
        """(padded batch size, q) of the graph a step replays, or None (eager). Its own q when
        captured; with ``round_up``, a q past every exact one takes the smallest short-prefill
        bucket that holds it, if the padding at most doubles the step's tokens and stays within
        PREFILL_MAX_PADDING rows."""
        if not (self.graphs or self.emulated) or table_width > self.max_blocks:
            return None
        if q in self.sizes_by_q:
            candidates = [q]
        elif round_up:
            candidates = [p for p in self.prefill_sizes_by_q if p > q]
        else:
            return None
        for gq in candidates:
            size = next((s for s in self.sizes_by_q[gq] if s >= num_seqs), None)
            if size is None:
                continue
            padding = size * gq - num_tokens
            if gq in self.prefill_sizes_by_q and padding > min(
                num_tokens + gq, PREFILL_MAX_PADDING
            ):
                return None  # a larger bucket pads more
            # Padded contexts (start + q) stay within what the block-table buffer and the
            # captured launch shapes cover.
            if num_tokens <= num_seqs * gq and max_seq_len + gq - 1 <= self._padded_max_seq_len(gq):
                return size, gq
            return None
        return None

    def _padded_max_seq_len(self, q: int) -> int:
        """Longest padded context (start + q) a graph of this q covers: contexts up to
        max_seq_len, plus a short-prefill bucket's padding."""
        return self.max_seq_len + (q - 1 if q in self.prefill_sizes_by_q else 0)

    def stage(
        self,
        src: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        q: int,
        fill: torch.Tensor | None = None,
        prev: torch.Tensor | None = None,
    ) -> int:
        """Write a step in which every request computes exactly q tokens into the static inputs
        (one kernel, ``kernels.ops_ref.stage_step_inputs``): ``src`` = (ids, positions, slots
        [b*q] int64, seq_lens [b] int32, block tables [b, w] int32), on the device or in pinned
        host memory; row t's id is ``prev[fill[t]]`` where fill[t] >= 0. ``fits`` must hold.
        Returns the batch size of the graph to replay."""
        b = src[3].shape[0]
        size = next(s for s in self.sizes_by_q[q] if s >= b)
        dst = (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables)
        self._stage_op(src, dst, q, size, fill, prev)
        return size

    def replay(
        self, size: int, q: int, num_tokens: int, seq_lens_cpu: list[int]
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """Replay the graph of a step staged by ``stage`` (``seq_lens_cpu``: its requests'
        contexts, read only when emulating)."""
        padded = seq_lens_cpu + [q] * (size - len(seq_lens_cpu)) if self.emulated else None
        return self._replay(size, q, padded)[:num_tokens]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [num_tokens, hidden], rows in the step's order
        """Replay the graph for this step (``can_run`` must hold). No host synchronization."""
        b, num_tokens = meta.num_seqs, input_ids.shape[0]
        key = self._graph_key(meta, num_tokens)
        assert key is not None, "run() needs can_run()"
        size, q = key
        if num_tokens == b * q:  # every request computes q tokens: the layout is the identity
            src = (input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables)
            self.stage(src, q)
            return self.replay(size, q, num_tokens, meta.seq_lens_cpu)
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(meta.block_tables)
        layout = uniform_query_layout(meta.query_start_loc_cpu, meta.seq_lens_cpu, q, size)
        dest = index_tensor(layout.dest, self.device)  # [num_tokens]
        n = size * q
        # Padding rows keep stale ids/positions (valid values from earlier steps); their slots
        # must be the null block.
        self.slot_mapping[:n].zero_()
        self.slot_mapping.index_copy_(0, dest, meta.slot_mapping)
        self.input_ids.index_copy_(0, dest, input_ids)
        self.positions.index_copy_(0, dest, positions)
        self.seq_lens[:size].copy_(to_device(layout.seq_lens, torch.int32, self.device))
        return self._replay(size, q, layout.seq_lens).index_select(0, dest)

    def _replay(
        self, size: int, q: int, seq_lens_cpu: list[int] | None
    ) -> torch.Tensor:  # [size * q, hidden]
        graph = self.graphs.get((size, q))
        if graph is None:  # emulated
            self.output[: size * q].copy_(self._forward(size, q, seq_lens_cpu))
        else:
            graph.replay()
        return self.output[: size * q]
