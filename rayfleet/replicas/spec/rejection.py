"""Speculative verification: the target's logits at a request's draft positions -> accepted tokens.

For a request with verified tokens x_<L and drafts d_1..d_k, the target computed logits at positions
L-1 .. L+k-1 in one forward (k+1 rows). Row j is the target's next-token distribution after
x_<L, d_1..d_j, turned into probabilities p_j by exactly the transform the ordinary sampler applies
(penalties over prompt + outputs + d_1..d_j, min_tokens mask, temperature, top-k, top-p, min-p).
q_j is the distribution the draft drew d_{j+1} from (same transform over the draft's logits).

Sampled rows (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"):

    for j = 0 .. k-1:
        accept d_{j+1} with probability min(1, p_j(d) / q_j(d))      (test: u * q_j(d) < p_j(d))
        on reject: emit one token from  r_j = max(0, p_j - q_j) / sum(max(0, p_j - q_j))  and stop
    all k accepted: emit a bonus token from p_k

Why this is exactly p_j: P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x)
= min(q(x), p(x)) + (1 - sum_y min(q(y), p(y))) * max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)),
and sum_y max(0, p - q) = 1 - sum_y min(p, q), so P(emit x) = min(p, q) + max(0, p - q) = p(x).
By induction over positions every emitted token follows the target's distribution given the tokens
before it, so a speculative run samples the same sequence distribution as a plain one.

Greedy rows (temperature < MIN_TEMPERATURE): d_{j+1} is accepted iff it equals argmax p_j (penalized
logits); the first mismatch emits that argmax, all-accepted emits argmax of row k. This is the
sampled rule with one-hot p and q, and makes speculative greedy output equal plain greedy output.

Randomness. A seeded request (params.seed) draws every random number from a stream named by
(seed, output position, purpose): the accept test of the token at output position i uses
``stream_uniform(seed, i, ACCEPT_STREAM)``, the resample/bonus race at position i uses a generator
seeded with ``stream_seed(seed, i, RESAMPLE_STREAM)``, and the draft's proposal at position i uses
``DRAFT_STREAM``. So a seeded request repeats exactly whenever the same drafts are proposed and
verified; unseeded requests share the verifier's own generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rayfleet.replicas.sampler import (
    MIN_TEMPERATURE,
    Sampler,
    SamplerRow,
    argmax_rows,
    reads_history,
    step_seed,
)
from rayfleet.replicas.transfer import index_tensor as _index
from rayfleet.replicas.transfer import to_device, to_device_packed
from rayfleet.sampling_params import SamplingParams

ACCEPT_STREAM = 1
RESAMPLE_STREAM = 2
DRAFT_STREAM = 3


def stream_seed(seed: int, position: int, stream: int) -> int:
    """Seed of the random stream ``stream`` for the token at output ``position``: distinct from
    the plain sampler's ``step_seed(seed, position)`` and from every other stream."""
    return step_seed(step_seed(seed, position), stream)


def stream_uniform(seed: int, position: int, stream: int) -> float:
    """A U[0, 1) number from the top 53 bits of ``stream_seed``: pure Python, any device."""
    return (stream_seed(seed, position, stream) >> 10) * 2.0**-53


@dataclass
class SpecRow:
    """One request to verify."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # verified outputs before this step
    eos_token_ids: frozenset[int]
    draft_token_ids: list[int]  # the k >= 1 drafts verified this step


class HistoryView(Sequence[int]):
    """``base + extra`` without copying ``base`` (a request's whole output history)."""

    def __init__(self, base: Sequence[int], extra: Sequence[int]) -> None:
        self._base = base
        self._extra = extra

    def __len__(self) -> int:
        return len(self._base) + len(self._extra)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self._base)
        if i < 0:
            i += len(self)
        return self._base[i] if i < n else self._extra[i - n]

    def __iter__(self):
        yield from self._base
        yield from self._extra


@dataclass
class SpecVerifyOutput:
    token_ids: list[list[int]]  # per request: accepted drafts + one correction or bonus token
    num_accepted: list[int]


def target_sampler_rows(rows: Sequence[SpecRow]) -> list[SamplerRow]:
    """The k+1 SamplerRows of each request: row j's history includes the drafts before it."""
    out: list[SamplerRow] = []
    for r in rows:
        out.extend(
            SamplerRow(
                params=r.params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=HistoryView(r.output_token_ids, r.draft_token_ids[:j]),
                eos_token_ids=r.eos_token_ids,
            )
            for j in range(len(r.draft_token_ids) + 1)
        )
    return out


class RejectionSampler:
    """Verifies drafts of many requests at once (greedy and sampled mixed)."""

    def __init__(self, seed: int = 0) -> None:
        # Uniforms are drawn on the CPU (k per request: tiny); races on the logits' device.
        self._cpu_gen = torch.Generator()
        self._cpu_gen.manual_seed(step_seed(seed, ACCEPT_STREAM))
        self._seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}
        self._row_gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device, per_row: bool) -> torch.Generator:
        table = self._row_gens if per_row else self._gens
        gen = table.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(step_seed(self._seed, RESAMPLE_STREAM))
            table[device] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SpecRow],
        draft_probs: torch.Tensor | None = None,
        best: Sequence[int] | None = None,
    ) -> SpecVerifyOutput:
        """``logits`` is [sum(k_i + 1), V]: request i's k_i + 1 target rows, requests in order.
        ``draft_probs`` is [sum of k_i over sampled requests, V]: the distribution each sampled
        request's drafts were drawn from, in order (greedy requests have none). ``best``: the
        argmax of every row, already on the host (only when every row is greedy and none is
        penalized, so the argmax of the raw logits is the rule's)."""
        ks = [len(r.draft_token_ids) for r in rows]
        if logits.dim() != 2 or logits.shape[0] != sum(k + 1 for k in ks):
            raise ValueError(f"logits must be [{sum(k + 1 for k in ks)}, V]; got {logits.shape}")
        device = logits.device
        srows: list[SamplerRow] | None = None
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < MIN_TEMPERATURE]
        if best is not None:
            if len(greedy) < len(rows) or any(_penalized(r) for r in rows):
                raise ValueError("best is for steps of greedy rows without penalties")
            if len(best) != logits.shape[0]:
                raise ValueError(f"best must hold {logits.shape[0]} ids; got {len(best)}")
            x = logits  # (nothing reads it)
        elif any(_penalized(r) for r in rows):
            srows = target_sampler_rows(rows)
            x = Sampler.apply_penalties(logits.float(), srows)  # [N, V]
        else:  # nothing reads the histories: the rows are the raw logits (only read below)
            x = logits.float()  # [N, V]
        offsets = [0]
        for k in ks:
            offsets.append(offsets[-1] + k + 1)
        token_ids: list[list[int]] = [[] for _ in rows]
        num_accepted = [0] * len(rows)

        if greedy:
            if best is None and len(greedy) == len(rows):
                best = argmax_rows(x).tolist()
            elif best is None:
                idx = [offsets[i] + j for i in greedy for j in range(ks[i] + 1)]
                best = argmax_rows(x[_index(idx, device)]).tolist()
            pos = 0
            for i in greedy:
                drafts = rows[i].draft_token_ids
                a = _leading([d == best[pos + j] for j, d in enumerate(drafts[: ks[i]])])
                token_ids[i] = drafts[:a] + [best[pos + a]]
                num_accepted[i] = a
                pos += ks[i] + 1

        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= MIN_TEMPERATURE]
        if sampled:
            if draft_probs is None or draft_probs.shape[0] != sum(ks[i] for i in sampled):
                raise ValueError("sampled requests' drafts need the distributions they came from")
            self._verify_sampled(
                x, draft_probs.float(), rows, srows, ks, offsets, sampled, token_ids, num_accepted
            )
        return SpecVerifyOutput(token_ids=token_ids, num_accepted=num_accepted)

    def _verify_sampled(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        rows: Sequence[SpecRow],
        srows: list[SamplerRow] | None,
        ks: list[int],
        offsets: list[int],
        sampled: list[int],
        token_ids: list[list[int]],
        num_accepted: list[int],
    ) -> None:
        device = x.device
        t_idx = [offsets[i] + j for i in sampled for j in range(ks[i] + 1)]
        if srows is not None:
            prows = [srows[t] for t in t_idx]
        else:  # sampling reads only the params: one row per request, repeated
            prows = [
                row
                for i in sampled
                for row in [SamplerRow(rows[i].params, (), (), rows[i].eos_token_ids)] * (ks[i] + 1)
            ]
        sub = x if len(t_idx) == x.shape[0] else x[_index(t_idx, device)]
        p = Sampler.sampling_probs(sub, prows)  # [P, V]
        # Row of p for draft j of sampled request number s, and where each request starts in p/q.
        p_start, q_start = [], []
        p_of_draft = []
        pp = qq = 0
        for i in sampled:
            p_start.append(pp)
            q_start.append(qq)
            p_of_draft.extend(range(pp, pp + ks[i]))
            pp += ks[i] + 1
            qq += ks[i]
        drafts = _index([d for i in sampled for d in rows[i].draft_token_ids[: ks[i]]], device)
        p_d = p[_index(p_of_draft, device), drafts]  # [Q] p_j(d_{j+1})
        q_d = q.gather(1, drafts.unsqueeze(1)).squeeze(1)  # [Q] q_j(d_{j+1}) > 0: d was drawn
        u = to_device(self._uniforms(rows, ks, sampled), torch.float32, device)  # [Q] U[0,1)
        # u < p/q without dividing; p >= q always accepts since u < 1.
        accept = u * q_d < p_d  # [Q]
        k_s = [ks[i] for i in sampled]
        kmax = max(k_s)
        # [S, kmax]: where each request's accept flags sit in accept, padded with one past its end
        pad = [
            qs + j if j < k else len(p_of_draft) for qs, k in zip(q_start, k_s) for j in range(kmax)
        ]
        k_t, p0, q0, pad_t = to_device_packed(
            [(k_s, torch.long), (p_start, torch.long), (q_start, torch.long), (pad, torch.long)],
            device,
        )
        counted: list[int] | None = None
        if any(rows[i].params.seed is not None for i in sampled):
            # A seeded race's stream is named by the output position it samples, which the
            # accepted count decides: count on the host first.
            flags = accept.tolist()
            counted = [_leading(flags[qs : qs + k]) for qs, k in zip(q_start, k_s)]
            a = to_device(counted, torch.long, device)
        else:
            # The count stays on the device: the step makes one transfer to the host (counts and
            # tokens together) instead of two with host work between them.
            padded = torch.cat((accept, accept.new_zeros(1)))[pad_t].view(len(sampled), kmax)
            a = padded.long().cumprod(1).sum(1)  # [S] leading accepts
        bonus = a == k_t  # [S]: every draft accepted
        p_fin = p[p0 + a]  # [S, V]
        # Bonus rows sample p_k itself: as if q were 0 there (row 0 of q stands in).
        if q.shape[0]:
            q_fin = q[torch.where(bonus, 0, q0 + a)].masked_fill(bonus.unsqueeze(1), 0.0)
        else:  # no sampled request drafted (every k is 0): each samples its bonus row
            q_fin = torch.zeros_like(p_fin)
        residual = (p_fin - q_fin).clamp_(min=0.0)  # unnormalized max(0, p - q)
        # In exact arithmetic a rejection implies some p(y) > q(y); guard against rounding.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, p_fin, residual)
        # Exponential race picks index y with probability residual[y] / sum(residual).
        e = self._exponentials(rows, sampled, counted, residual)
        chosen = argmax_rows(residual / e)
        if counted is None:
            counted, picked = torch.stack((a, chosen)).tolist()
        else:
            picked = chosen.tolist()
        for s, i in enumerate(sampled):
            num_accepted[i] = counted[s]
            token_ids[i] = rows[i].draft_token_ids[: counted[s]] + [picked[s]]

    def _uniforms(self, rows: Sequence[SpecRow], ks: list[int], sampled: list[int]) -> list[float]:
        out: list[float] = []
        unseeded = [
            torch.rand(ks[i], generator=self._cpu_gen).tolist()
            if rows[i].params.seed is None
            else None
            for i in sampled
        ]
        for s, i in enumerate(sampled):
            seed = rows[i].params.seed
            if seed is None:
                out.extend(unseeded[s])  # type: ignore[arg-type]
            else:
                base = len(rows[i].output_token_ids)
                out.extend(stream_uniform(seed, base + j, ACCEPT_STREAM) for j in range(ks[i]))
        return out

    def _exponentials(
        self,
        rows: Sequence[SpecRow],
        sampled: list[int],
        num_accepted: list[int] | None,  # per sampled request; read for seeded ones only
        like: torch.Tensor,
    ) -> torch.Tensor:
        device = like.device
        e = torch.empty_like(like)
        unseeded = [s for s, i in enumerate(sampled) if rows[i].params.seed is None]
        if unseeded:
            noise = torch.empty(len(unseeded), like.shape[1], device=device)
            noise.exponential_(generator=self._gen(device, per_row=False))
            e[_index(unseeded, device)] = noise
        for s, i in enumerate(sampled):
            seed = rows[i].params.seed
            if seed is None:
                continue
            gen = self._gen(device, per_row=True)
            assert num_accepted is not None
            position = len(rows[i].output_token_ids) + num_accepted[s]
            gen.manual_seed(stream_seed(seed, position, RESAMPLE_STREAM))
            e[s].exponential_(generator=gen)
        return e.clamp_(min=torch.finfo(e.dtype).tiny)


def _leading(flags: Sequence[bool]) -> int:
    """How many of ``flags`` are true before the first false."""
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def _penalized(row: SpecRow) -> bool:
    """The row's transform reads its history: penalties, or min_tokens not yet reached."""
    return reads_history(row.params) or len(row.output_token_ids) < row.params.min_tokens
