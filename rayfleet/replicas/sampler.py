"""Turns one step's logits into token ids: penalties, min_tokens, temperature, top-k/top-p/min-p.

Order per row (each stage is skipped, batch-wide, when no row uses it):

    raw logits ─▶ repetition penalty (prompt + output) ─▶ presence/frequency (output only)
               ─▶ min_tokens mask (EOS unless ignore_eos, stop_token_ids)
               ─▶ greedy rows: argmax
               ─▶ sampled rows: / temperature ─▶ top_k ─▶ top_p ─▶ min_p ─▶ exponential race

Sampling is the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per vocab entry,
which picks token ``i`` with probability ``probs[i]``. A seeded row draws its ``E`` from a generator
seeded with ``mix(seed, len(output_token_ids))``, so its token depends only on (seed, position,
logits): not on batch size, batch order, preemption/recompute or step boundaries. Streams are
reproducible per device type (CPU and CUDA generators differ). Unseeded rows share the sampler's own
generator.

Logprobs are reported under the model's raw distribution: ``log_softmax`` of the logits as given,
before penalties, temperature and truncation (vLLM's default "raw_logprobs").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from rayfleet import kernels
from rayfleet.replicas.transfer import index_tensor as _index
from rayfleet.replicas.transfer import to_device as _to_device
from rayfleet.sampling_params import SamplingParams

# Temperatures below this are treated as greedy: dividing by them overflows float32 logits.
MIN_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, position: int) -> int:
    """Generator seed for the token at output ``position`` of a request seeded with ``seed``."""
    return _splitmix64(_splitmix64(seed) ^ position) >> 1  # 63 bits: valid for every backend


@dataclass
class SamplerRow:
    """One row of logits and what the sampler needs to know about its request."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated before this step's token
    eos_token_ids: frozenset[int]
    # Outputs sampled by steps still in flight (overlapped scheduling): counted for min_tokens
    # and seeded positions, absent from output_token_ids. Rows with penalties never have any.
    num_pending: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending


def needs_host_history(params: SamplingParams) -> bool:
    """Whether sampling this request reads its generated token ids (penalties) or reports on
    them (logprobs): such a row cannot be sampled while its previous token is still in flight."""
    return reads_history(params) or params.logprobs is not None


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float  # of token_id under the raw distribution
    rank: int  # 1 = most likely; tied tokens share the best rank
    top: list[tuple[int, float]]  # the params.logprobs most likely (id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the row did not ask


class Sampler:
    """Stateless apart from the generator that unseeded rows draw from."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # Reseeded for every seeded row; kept to avoid building a generator per row per step.
        self._row_generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def _row_generator(self, device: torch.device) -> torch.Generator:
        gen = self._row_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._row_generators[device] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplerRow],
        queued: Callable[[], None] | None = None,
    ) -> SamplerOutput:
        """Sample every row; ``queued`` is called once the device work is queued, before the
        host waits for the ids (the runner's end-of-step event for the cost model)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab]; got {tuple(logits.shape)}"
            )
        num_rows = len(rows)
        if num_rows == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        token_ids = self.sample_on_device(logits, rows)
        if queued is not None:
            queued()
        ids = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            _fill_logprobs(logits.float(), rows, want, token_ids, logprobs)
        return SamplerOutput(token_ids=ids, logprobs=logprobs)

    def sample_on_device(
        self, logits: torch.Tensor, rows: list[SamplerRow], out_host: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [N] (int64, on the logits' device), without synchronizing with the device;
        with ``out_host`` (pinned [N] int64 on CUDA) they are also stored there, in stream
        order (overlapped scheduling reads them there once the step's event has passed)."""
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < MIN_TEMPERATURE]
        if len(greedy) == len(rows) and not self._masks_anything(rows):
            # argmax of the model-dtype logits equals argmax of their exact float32 upcast.
            return argmax_rows(logits, out_host)
        token_ids = self._sample_rows(logits, rows, greedy)
        if out_host is not None:
            out_host.copy_(token_ids, non_blocking=True)
        return token_ids

    def _sample_rows(
        self, logits: torch.Tensor, rows: list[SamplerRow], greedy: list[int]
    ) -> torch.Tensor:  # [N] int64
        x = self.apply_penalties(logits.float(), rows)  # [N, V]
        if len(greedy) == len(rows):
            return argmax_rows(x)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)
        sampled = [i for i, r in enumerate(rows) if r.params.temperature >= MIN_TEMPERATURE]
        if greedy:
            idx = _index(greedy, x.device)
            token_ids[idx] = argmax_rows(x[idx])
        if len(sampled) == len(rows):
            probs = self.sampling_probs(x, rows)
            return argmax_rows(probs / self._exponentials(rows, probs))
        idx = _index(sampled, x.device)
        sub_rows = [rows[i] for i in sampled]
        probs = self.sampling_probs(x[idx], sub_rows)
        race = probs / self._exponentials(sub_rows, probs)
        token_ids[idx] = argmax_rows(race)
        return token_ids

    @staticmethod
    def _masks_anything(rows: list[SamplerRow]) -> bool:
        """Whether apply_penalties would change any row (penalties or an active min_tokens)."""
        return any(
            r.params.repetition_penalty != 1.0
            or (
                (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
                and r.num_output_tokens > 0
            )
            or r.num_output_tokens < r.params.min_tokens
            for r in rows
        )

    @staticmethod
    def token_logprobs(
        raw: torch.Tensor, rows: list[SamplerRow], token_ids: list[int]
    ) -> list[TokenLogprobs | None]:
        """Logprobs of given tokens (e.g. ones a speculative verifier accepted) under the raw
        rows ``raw`` [N, V], for the rows that ask for logprobs; None elsewhere."""
        out: list[TokenLogprobs | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            ids = _index(token_ids, raw.device)
            _fill_logprobs(raw.float(), rows, want, ids, out)
        return out

    @staticmethod
    def apply_penalties(raw: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """Repetition and presence/frequency penalties, min_tokens mask; returns a new tensor
        (``raw`` itself when nothing applies)."""
        if not Sampler._masks_anything(rows):
            return raw
        x = raw.clone()
        vocab = x.shape[1]
        device = x.device

        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            seen = torch.zeros(len(rep) * vocab, dtype=torch.bool, device=device)
            seqs = [rows[i].prompt_token_ids for i in rep] + [rows[i].output_token_ids for i in rep]
            seen[_flat_token_index(seqs, list(range(len(rep))) * 2, vocab, device)] = True
            seen = seen.view(len(rep), vocab)
            idx = _index(rep, device)
            p = _to_device(
                [rows[i].params.repetition_penalty for i in rep], torch.float32, device
            ).unsqueeze(1)  # [R, 1]
            sub = x[idx]
            penalized = torch.where(sub > 0, sub / p, sub * p)
            x[idx] = torch.where(seen, penalized, sub)

        pf = [
            i
            for i, r in enumerate(rows)
            if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
            and len(r.output_token_ids) > 0
        ]
        if pf:
            counts = torch.zeros(len(pf) * vocab, dtype=torch.float32, device=device)
            seqs = [rows[i].output_token_ids for i in pf]
            flat = _flat_token_index(seqs, list(range(len(pf))), vocab, device)
            counts.index_add_(
                0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=device)
            )
            counts = counts.view(len(pf), vocab)
            presence = _to_device(
                [rows[i].params.presence_penalty for i in pf], torch.float32, device
            )
            frequency = _to_device(
                [rows[i].params.frequency_penalty for i in pf], torch.float32, device
            )
            idx = _index(pf, device)
            x[idx] = (
                x[idx]
                - presence.unsqueeze(1) * (counts > 0).float()
                - frequency.unsqueeze(1) * counts
            )

        mask_min_tokens(x, ((r.params, r.num_output_tokens, r.eos_token_ids) for r in rows))
        return x

    @staticmethod
    def sampling_probs(x: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """Probabilities the sampled rows draw from: temperature, then top_k, top_p, min_p.

        ``x`` is [R, V] penalized logits of rows with temperature >= MIN_TEMPERATURE.
        """
        device = x.device
        vocab = x.shape[1]
        temps = _to_device([r.params.temperature for r in rows], torch.float32, device)
        x = x / temps.unsqueeze(1)

        trunc = [
            j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0
        ]
        if trunc:
            idx = _index(trunc, device)
            sub = x[idx]
            # Stable sort so that ties are broken the same way in every batch.
            sorted_x, order = sub.sort(dim=-1, descending=True, stable=True)  # [T, V]
            pos = torch.arange(vocab, device=device).unsqueeze(0)  # [1, V]
            k = _to_device(
                [rows[j].params.top_k if rows[j].params.top_k > 0 else vocab for j in trunc],
                torch.int64,
                device,
            ).unsqueeze(1)
            drop = pos >= k
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            top_p = _to_device([rows[j].params.top_p for j in trunc], torch.float32, device)
            sorted_p = sorted_x.softmax(dim=-1)
            # Keep position i iff the mass strictly before it is < top_p: the smallest prefix whose
            # mass reaches top_p; position 0 always survives. top_p == 1 keeps everything.
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1.0)
            drop[:, 0] = False
            sub = sub.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
            x[idx] = sub

        probs = x.softmax(dim=-1)
        minp = [j for j, r in enumerate(rows) if r.params.min_p > 0.0]
        if minp:
            idx = _index(minp, device)
            sub = probs[idx]
            min_p = _to_device([rows[j].params.min_p for j in minp], torch.float32, device)
            floor = min_p.unsqueeze(1) * sub.max(dim=-1, keepdim=True).values
            sub = sub.masked_fill(sub < floor, 0.0)
            probs[idx] = sub / sub.sum(dim=-1, keepdim=True)
        return probs

    def _exponentials(self, rows: list[SamplerRow], probs: torch.Tensor) -> torch.Tensor:
        """[R, V] i.i.d. Exp(1) noise; seeded rows get their own (seed, position) stream."""
        e = torch.empty_like(probs)
        device = probs.device
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            noise = torch.empty(len(unseeded), probs.shape[1], device=device)
            noise.exponential_(generator=self._generator(device))
            e[_index(unseeded, device)] = noise
        for j, r in enumerate(rows):
            seed = r.params.seed
            if seed is None:
                continue
            gen = self._row_generator(device)
            gen.manual_seed(step_seed(seed, r.num_output_tokens))
            e[j].exponential_(generator=gen)
        # Exp(1) can come out as exactly 0; 0/0 would be NaN, which argmax ranks first.
        return e.clamp_(min=torch.finfo(e.dtype).tiny)


def argmax_rows(
    x: torch.Tensor, out_host: torch.Tensor | None = None
) -> torch.Tensor:  # [N, V] -> [N] int64
    """``x.argmax(dim=-1)``: the first index on ties, NaN ranked highest; with ``out_host`` (a
    pinned [N] int64 host tensor on CUDA) the ids are also stored there, in stream order. On CUDA
    the Triton kernel (kernels/triton_step_io.py): torch's argmax reduces a row in one block,
    28 us over a 128k vocabulary at batch 1 on an H100."""
    return kernels.get_or_default("argmax", "triton" if x.is_cuda else None)(x, out_host)


def reads_history(params: SamplingParams) -> bool:
    """Penalties that read the previous tokens (beyond their count)."""
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def mask_min_tokens(
    x: torch.Tensor, rows: Iterable[tuple[SamplingParams, int, frozenset[int]]]
) -> None:
    """In place on ``x`` [R, V]: -inf at the EOS (unless ignore_eos) and stop ids of each row
    (params, outputs so far, eos ids) that has fewer than params.min_tokens outputs."""
    vocab = x.shape[1]
    banned: list[int] = []
    for i, (params, num_outputs, eos_token_ids) in enumerate(rows):
        if num_outputs >= params.min_tokens:
            continue
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= eos_token_ids
        banned.extend(i * vocab + t for t in ids if 0 <= t < vocab)
    if banned:
        x.view(-1)[_index(banned, x.device)] = float("-inf")


def _flat_token_index(
    seqs: list[Sequence[int]], rows_of: list[int], vocab: int, device: torch.device
) -> torch.Tensor:
    """Indices into a flattened [R, vocab] tensor of every token of ``seqs[k]`` in row
    ``rows_of[k]``; ids outside the vocab are dropped."""
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    rows = torch.repeat_interleave(
        torch.tensor(rows_of, dtype=torch.long), torch.tensor([len(q) for q in seqs])
    )
    flat = (rows * vocab + ids)[(ids >= 0) & (ids < vocab)]
    return _to_device(flat, torch.long, device)


def _fill_logprobs(
    raw: torch.Tensor,
    rows: list[SamplerRow],
    want: list[int],
    token_ids: torch.Tensor,
    out: list[TokenLogprobs | None],
) -> None:
    device = raw.device
    idx = _index(want, device)
    lp = raw[idx].log_softmax(dim=-1)  # [W, V]
    chosen = token_ids[idx]
    chosen_lp = lp.gather(1, chosen.unsqueeze(1))  # [W, 1]
    ranks = (lp > chosen_lp).sum(dim=-1) + 1
    n_max = min(max(rows[i].params.logprobs or 0 for i in want), lp.shape[1])
    top_lp, top_ids = lp.topk(n_max, dim=-1)  # [W, n_max], best first
    chosen_l = chosen.tolist()
    chosen_lp_l = chosen_lp.squeeze(1).tolist()
    ranks_l = ranks.tolist()
    top_lp_l = top_lp.tolist()
    top_ids_l = top_ids.tolist()
    for j, i in enumerate(want):
        n = rows[i].params.logprobs or 0
        out[i] = TokenLogprobs(
            token_id=chosen_l[j],
            logprob=chosen_lp_l[j],
            rank=ranks_l[j],
            top=list(zip(top_ids_l[j][:n], top_lp_l[j][:n])),
        )
