"""One CUDA graph per greedy draft proposal: all k forwards of the draft, each with its LM head
and argmax, in a single replay.

A draft forward is short (a llama-3.2-1b shape on an H100: 1.1 ms at batch 1, 0.9 with FP8
weights, 1.7 ms at batch 64), and replaying it as a decode graph still costs the host input
building, a staging kernel, the replay, the LM head's and the argmax's launches and the sampling
bookkeeping for every forward, more the larger the batch. That host work sits between the
verification and the draft's first forward, where the device waits for it (the policy's sync
overhead H, spec/adaptive.py), and with a fast draft the host, not the device, sets the pace of
the proposal. A proposal of greedy requests has no data-dependent control flow:
every forward's positions, slots and context lengths are known before the first one runs, and
only token ids flow from one forward to the next. So the host builds all of them at once, copies
them into one static buffer, and replays one graph keyed by (padded batch size, first-forward
query length q, k):

    forward 1     the verified tokens not yet in the draft's cache, 1..q per request, padded to q
                  (DecodeGraphs' uniform layout: real rows first, seq_len = start + q, padding
                  rows write the null slot) -> hidden of each request's last real row -> d_1
    forward j     d_{j-1} at position end + j - 2, one row per request -> d_j      (j = 2 .. k)

Rows of requests proposing fewer than k drafts, and padding requests, run every forward too:
after their last draft their rows write K/V into the null slot (block 0, never allocated) and
their outputs are never read, so real rows and the cache outside block 0 see exactly what the
eager loop gives them.

Only greedy requests without penalties and past their min_tokens take this path (what they draw
needs no generator state and no host-side history); anything else runs the eager loop of
``DraftProposer.propose``.

Chained proposals (``run_chained``; the runner queues them behind the verification whose result
they follow, ModelRunner._chain). A request with L verified tokens verified kv drafts and the
device knows, the host not yet, how many it accepted: a. The proposal after it is the (size, 2,
k) graph, staged by the host as if a were 0 (forward 1 at positions L - 1 and L), then moved by
one kernel on the device (ops_ref.chain_proposal_inputs), which counts a from the target's
argmax and the verified drafts:

    forward 1     d_a (x_{L-1} when a = 0) at L + a - 1, the target's token after the run at
                  L + a; the first row writes its K/V only when a = kv (d_kv was never fed),
                  else the null slot: its KV is the draft's already
    forward j     d_{j-1} at L + a + j - 1                                        (j = 2 .. k)

so the draft ends as a proposal made from the result would leave it: KV valid below
L + a + k. Forward 1 always computes two rows, where one would do after a rejection: on the
H100 that costs a llama-3.2-1b-shaped draft 0.33 ms with FP8 weights and 0.23 ms in bf16 (the
narrow layers' two-row GEMVs), about what chaining saves at batch 1.

Cost (H100, llama-3.2-1b-shaped draft, k up to 8, batch sizes 1..64: 128 graphs): 346 MiB of
device memory (the free-memory drop over the capture; reported as draft_cuda_graph_bytes) and
about 17 s more engine start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rayfleet import kernels
from rayfleet.kernels.ops_ref import CHAIN_FIELDS
from rayfleet.replicas.cuda_graphs import capture_graphs, static_metadata
from rayfleet.replicas.runner import slot_mapping
from rayfleet.replicas.sampler import MIN_TEMPERATURE, argmax_rows, reads_history
from rayfleet.replicas.transfer import PinnedStaging

logger = logging.getLogger(__name__)

# The largest batch whose greedy proposals replay one graph. The host's work per eager draft
# forward grows with the batch (H100, llama-3.2-1b-shaped draft: a batch-64 proposal of k = 2
# cost the host 2.6 ms eagerly, and the policy's sync overhead H there 3.3-3.7 ms against 1.6 ms
# in runs that kept speculating); past it, proposals replay the per-forward decode graphs.
MAX_BATCH = 64
# Query lengths of forward 1: the correction after a rejection (1), d_k and the bonus token after
# a fully accepted run (2). Three (after a speculation-off step) runs the eager loop.
FIRST_QUERY_LENS = (1, 2)
# A chained proposal's per-row parameters (run_chained), int64 after its layout's values:
# x_last, off, dbase, kv.
CHAIN_PARAMS = 4


@dataclass(frozen=True)
class _Layout:
    """Offsets into the static int64 inputs for one (size, q, k) graph (the block tables follow
    them in the same byte buffer). Each field is a (start, length) pair; step arrays are
    forward-major (forward j's rows at (j - 2) * size)."""

    ids: tuple[int, int]  # [size * q] forward 1's input ids
    pos: tuple[int, int]  # [size * q] their positions
    slots: tuple[int, int]  # [size * q] their KV slots
    seq_lens: tuple[int, int]  # [size] forward 1's context lengths (start + q)
    last: tuple[int, int]  # [size] each request's last real row in forward 1
    step_pos: tuple[int, int]  # [(k - 1) * size] forwards 2..k
    step_slots: tuple[int, int]
    step_seq_lens: tuple[int, int]
    total: int

    @classmethod
    def of(cls, size: int, q: int, k: int) -> _Layout:
        o = 0
        fields = {}
        for name, n in (
            ("ids", size * q),
            ("pos", size * q),
            ("slots", size * q),
            ("seq_lens", size),
            ("last", size),
            ("step_pos", (k - 1) * size),
            ("step_slots", (k - 1) * size),
            ("step_seq_lens", (k - 1) * size),
        ):
            fields[name] = (o, n)
            o += n
        return cls(**fields, total=o)


def eligible(reqs: Sequence) -> bool:
    """Whether a proposal's requests (DraftRequests) draw nothing but argmax drafts the graph
    reproduces: greedy, no history-reading penalties, min_tokens already met, every request
    drafting (none only filling KV)."""
    return all(
        r.num_spec > 0
        and r.params.temperature < MIN_TEMPERATURE
        and not reads_history(r.params)
        and len(r.output_token_ids) >= r.params.min_tokens
        for r in reqs
    )


class ProposalGraphs:
    """Graphs of whole greedy proposals, keyed by (padded batch size, q, k); see the module
    docstring. ``emulate``: nothing captured, the same static buffers and padded layouts run
    eagerly (CPU tests)."""

    def __init__(
        self,
        proposer,
        *,
        capture_sizes: Sequence[int],
        max_k: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        emulate: bool = False,
    ) -> None:
        self.model = proposer.model
        self.kv_caches = proposer.kv_caches
        self.attn_kernels = proposer.attn_kernels
        self.block_size = proposer.block_size
        self.device = proposer.device
        self.sizes = sorted(s for s in capture_sizes if s <= MAX_BATCH)
        self.max_k = max_k
        self.width = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        self.emulated = emulate
        self.keys = [
            (s, q, k) for s in self.sizes for q in FIRST_QUERY_LENS for k in range(1, max_k + 1)
        ]
        dev = self.device
        # (a chained proposal's per-row parameters follow its layout: run_chained)
        cap = max(
            (_Layout.of(s, q, k).total + CHAIN_PARAMS * s for s, q, k in self.keys), default=0
        )
        max_size = max(self.sizes, default=0)
        # Static inputs every graph reads, in one byte buffer that a replay fills with one copy:
        # int64 values at [0, 8 * cap) (a graph reads its own layout's prefix), then the block
        # tables, int32 [max_size, width] (a graph of size b reads the first b rows). A replay
        # writes its requests' rows only: the rows past them are stale, and read only by
        # padding requests, whose outputs nobody reads and whose K/V go to the null slot.
        self._tables_at = 8 * cap
        self._static = torch.zeros(
            self._tables_at + 4 * max_size * self.width, dtype=torch.uint8, device=dev
        )
        self.inputs = self._static[: self._tables_at].view(torch.int64)
        self.tables = self._static[self._tables_at :].view(torch.int32).view(max_size, self.width)
        # The drafts a graph writes: [size, k] row-major in the first size * k entries.
        self.drafts = torch.zeros(max_size * max_k, dtype=torch.int64, device=dev)
        self.qsl = {
            q: torch.arange(max(self.sizes, default=0) + 1, dtype=torch.int32, device=dev) * q
            for q in FIRST_QUERY_LENS
        }
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.memory_bytes = 0
        self._staging = PinnedStaging(dev)

    def key(self, reqs: Sequence, kmax: int) -> tuple[int, int, int] | None:
        """The graph that replays this proposal (requests in row order), or None."""
        if not self.sizes or len(reqs) > self.sizes[-1] or not 1 <= kmax <= self.max_k:
            return None
        n = max(r.end - r.start for r in reqs)
        q = next((q for q in FIRST_QUERY_LENS if q >= n), None)
        if q is None:
            return None
        if any(len(r.block_ids) > self.width for r in reqs):
            return None
        # The deepest context any real row reaches: forward 1's padded one, forward k's.
        if max(max(r.start + q, r.end + kmax - 1) for r in reqs) > self.max_seq_len:
            return None
        size = next(s for s in self.sizes if s >= len(reqs))
        return size, q, kmax

    def _host_inputs(
        self, reqs: Sequence, size: int, q: int, k: int, *, ids_known: bool = True
    ) -> list[int]:
        """The layout's int64 values for ``reqs`` (rows 0..len(reqs)-1, padding after). Plain
        lists: at these sizes (tens to a few thousand values) numpy's per-call cost dominates.
        ``ids_known=False``: forward 1's ids are left 0 (a chained proposal's come from the
        device)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        last: list[int] = []
        step_pos = [[] for _ in range(k - 1)]  # type: list[list[int]]
        step_slots = [[] for _ in range(k - 1)]  # type: list[list[int]]
        pad = [0] * q
        for i in range(size):
            if i < len(reqs):
                r = reqs[i]
                start, end, blocks = r.start, r.end, r.block_ids
                n = end - start
                ids += r.token_ids[start:end] if ids_known else pad[:n]
                ids += pad[n:]
                slots += slot_mapping(blocks, start, end, bs)
                slots += pad[n:]  # padding rows write the null slot
                # forwards 2..k: rows past the request's last draft write the null slot (the
                # drafting ones stay within its blocks: the scheduler's lookahead)
                drafting = r.num_spec - 1
            else:  # a padding request: q padding rows at 0..q-1, then one row per forward
                start, end, n, blocks = 0, q, 1, ()
                ids += pad
                slots += pad
                drafting = 0
            # forward 1's padding rows keep positions start + j < start + q (context start + q)
            pos += range(start, start + q)
            seq_lens.append(start + q)
            last.append(i * q + n - 1)
            for j in range(k - 1):  # forward j + 2 feeds d_{j+1} at position end + j
                p = end + j
                step_pos[j].append(p)
                step_slots[j].append(blocks[p // bs] * bs + p % bs if j < drafting else 0)
        out = ids + pos + slots + seq_lens + last
        for rows in step_pos:
            out += rows
        for rows in step_slots:
            out += rows
        for rows in step_pos:
            out += [p + 1 for p in rows]
        return out

    def _stage(self, reqs: Sequence, values: list[int]) -> None:
        """Copy ``values`` (the layout) and the requests' block-table rows into the static
        inputs: one copy from pinned memory (a plain one on CPU)."""
        n, m, w = len(values), len(reqs), self.width
        nbytes = self._tables_at + 4 * m * w
        host = self._staging.take(nbytes) if self.device.type == "cuda" else None
        buf = host[:nbytes] if host is not None else torch.zeros(nbytes, dtype=torch.uint8)
        buf[: 8 * n].view(torch.int64).numpy()[:] = values
        if m:
            table = buf[self._tables_at :].view(torch.int32).numpy().reshape(m, w)
            table.fill(0)
            for i, r in enumerate(reqs):
                table[i, : len(r.block_ids)] = r.block_ids
        if host is None:
            self._static[:nbytes].copy_(buf)
            return
        self._static[:nbytes].copy_(buf, non_blocking=True)
        self._staging.queued()

    def _body(
        self, size: int, q: int, k: int, host: list[int] | None = None
    ) -> torch.Tensor:  # [size, k] the drafts
        """The proposal over the static buffers (what a graph captures). ``host``: the staged
        values, for the reference backend's host-side context lengths (emulation)."""
        lay = _Layout.of(size, q, k)
        buf = self.inputs

        def get(field: tuple[int, int]) -> torch.Tensor:
            return buf[field[0] : field[0] + field[1]]

        def cpu(field: tuple[int, int], o: int = 0) -> list[int] | None:
            return None if host is None else host[field[0] + o : field[0] + o + size]

        table = self.tables[:size]
        meta = static_metadata(
            get(lay.slots),
            self.qsl[q][: size + 1],
            get(lay.seq_lens).to(torch.int32),
            table,
            q,
            self.max_seq_len,
            cpu(lay.seq_lens),
        )
        batch = self.attn_kernels.batch(meta, self.kv_caches)
        hidden = self.model(get(lay.ids), get(lay.pos), batch)
        if q > 1:
            hidden = hidden.index_select(0, get(lay.last))
        drafts = self.drafts[: size * k].view(size, k)
        tokens = argmax_rows(self.model.compute_logits(hidden))
        drafts[:, 0] = tokens
        step_pos, step_slots = get(lay.step_pos), get(lay.step_slots)
        step_seq_lens = get(lay.step_seq_lens).to(torch.int32)
        for j in range(1, k):
            o = (j - 1) * size
            meta = static_metadata(
                step_slots[o : o + size],
                self.qsl[1][: size + 1],
                step_seq_lens[o : o + size],
                table,
                1,
                self.max_seq_len,
                cpu(lay.step_seq_lens, o),
            )
            hidden = self.model(
                tokens, step_pos[o : o + size], self.attn_kernels.batch(meta, self.kv_caches)
            )
            tokens = argmax_rows(self.model.compute_logits(hidden))
            drafts[:, j] = tokens
        return drafts

    def run(self, reqs: Sequence, key: tuple[int, int, int]) -> torch.Tensor:
        """Replay the proposal of ``reqs`` (``key`` from ``key()``); returns their drafts
        [len(reqs), k] int64 on the device (draft j + 1 of request i at [i, j]; past a
        request's num_spec, values nobody reads). No host synchronization."""
        size, q, k = key
        values = self._host_inputs(reqs, size, q, k)
        self._stage(reqs, values)
        return self._replay(key, len(reqs), lambda: values)

    def run_chained(
        self,
        reqs: Sequence,
        key: tuple[int, int, int],
        chain: Sequence[tuple[int, int, int, int]],
        best: torch.Tensor,
        verified_drafts: torch.Tensor,
    ) -> torch.Tensor:
        """Replay the proposal that follows a verification still on the device (the module
        docstring's "Chained proposals"). ``key`` is (size, 2, k); ``reqs[i]`` has
        ``start = L - 1``, ``end = L + 1`` for its L verified tokens before the verification,
        its block table and num_spec; ``chain[i]`` is (x_last, off, dbase, kv): its newest
        verified token x_{L-1}, its first row in ``best`` (the target's argmax per verified
        row, [N] int64), where its kv verified drafts start in ``verified_drafts`` (flat int64).
        Returns the drafts as ``run`` does."""
        size, q, k = key
        assert q == 2 and len(chain) == len(reqs)
        values = self._host_inputs(reqs, size, q, k, ids_known=False)
        for field in zip(*chain):
            values += field
            values += [0] * (size - len(reqs))  # padding rows: kv = 0, so a = 0
        self._stage(reqs, values)
        self._derive_chained(size, k, best, verified_drafts)
        # (emulated: the values the device derived, read back)
        total = _Layout.of(size, q, k).total
        return self._replay(key, len(reqs), lambda: self.inputs[:total].tolist())

    def _replay(
        self, key: tuple[int, int, int], num_reqs: int, host_values: Callable[[], list[int]]
    ) -> torch.Tensor:
        """Replay the staged proposal ``key`` (emulated: its body, eagerly, with the staged
        values on the host, ``host_values()``); the drafts of its first ``num_reqs`` rows."""
        size, q, k = key
        graph = self.graphs.get(key)
        if graph is None:
            if not self.emulated:
                raise KeyError(f"no proposal graph for {key}")
            self._body(size, q, k, host_values())
        else:
            graph.replay()
        # A copy: the next proposal overwrites the static drafts while these may still be read.
        return self.drafts[: size * k].view(size, k)[:num_reqs].clone()

    def _derive_chained(
        self,
        size: int,
        k: int,
        best: torch.Tensor,
        verified_drafts: torch.Tensor,
    ) -> None:
        """Turn the staged a = 0 layout of (size, 2, k) into the one for each row's accepted
        count a, on the device (stream-ordered after the verification that wrote ``best``):
        ops_ref.chain_proposal_inputs, one kernel on CUDA."""
        lay = _Layout.of(size, 2, k)
        offsets = (
            *(getattr(lay, f)[0] for f in CHAIN_FIELDS[:-1]),
            lay.total,  # the per-row parameters follow the layout
        )
        backend = "triton" if self.device.type == "cuda" else None
        kernels.get_or_default("chain_proposal_inputs", backend)(
            self.inputs,
            self.tables,
            best,
            verified_drafts,
            offsets,
            size,
            k,
            self.block_size,
            max_kv=self.max_k,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        def prepare(key: tuple[int, int, int]) -> None:
            self._stage([], self._host_inputs([], *key))  # all padding: writes to the null block

        # Largest first; the largest k of a (batch, q) launches every kernel shape of the others.
        keys = sorted(self.keys, key=lambda key: (key[0] * key[1], key[2]), reverse=True)
        graphs, self.memory_bytes = capture_graphs(
            keys, lambda key: self._body(*key), prepare, warm_key=lambda key: key[:2]
        )
        self.graphs.update(graphs)
        if self.sizes:  # compile the chained proposals' input kernel now, not in a step
            size = self.sizes[0]
            self._stage([], self._host_inputs([], size, 2, 1) + [0] * (CHAIN_PARAMS * size))
            zero = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._derive_chained(size, 1, zero, zero)
        logger.info(
            "captured %d draft proposal graphs (batch %s, k 1..%d) using %.1f MiB",
            len(self.graphs),
            self.sizes,
            self.max_k,
            self.memory_bytes / 2**20,
        )
