"""Request state as the scheduler sees it. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from rayfleet.hashing import BlockHash, hash_blocks, root_hash


def max_num_spec_tokens(
    num_tokens: int, num_output_tokens: int, max_tokens: int, max_model_len: int
) -> int:
    """Most draft tokens a request may carry into its next step.

    Verifying d drafts computes positions up to ``num_tokens + d - 1`` and can yield d + 1 tokens
    (all accepted + the bonus). Without speculation the last position ever computed is
    ``max_model_len - 2`` and at most ``max_tokens`` outputs are made, so d is capped to keep both:
    ``num_tokens + d <= max_model_len - 1`` and ``num_output_tokens + d + 1 <= max_tokens``.
    Shared by the scheduler (trims proposals) and the runner (never drafts past it).
    """
    return max(0, min(max_model_len - 1 - num_tokens, max_tokens - num_output_tokens - 1))


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass(eq=False)
class Request:
    """One generation request.

    The single quantity that drives scheduling is ``num_computed_tokens``: how many tokens of
    the token list (prompt, then verified outputs, then this step's draft tokens) have their KV
    in the cache. Prefill, chunked prefill, prefix-cache hits, resumption after preemption and
    speculative verification all reduce to "compute tokens [num_computed_tokens, num_tokens)".
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling_params: Any = None  # opaque to the scheduler; handed to the runner
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    tenant: str | None = None
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Draft tokens to verify this step; never hashed, never counted as output.
    spec_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled by steps still in flight (overlapped scheduling), not yet appended: the
    # next step computes them from the runner's device-side copy. 0 outside overlap.
    num_pending_tokens: int = 0
    # Prompt tokens served from the prefix cache at first scheduling (-1 until then).
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Hash chain over the full blocks of verified tokens, extended lazily by the KV cache manager.
    block_hashes: list[BlockHash] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Verified tokens: prompt + outputs (draft tokens excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)

    def token_id(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        if i < p:
            return self.prompt_token_ids[i]
        i -= p
        if i < len(self.output_token_ids):
            return self.output_token_ids[i]
        return self.spec_token_ids[i - len(self.output_token_ids)]

    def token_ids_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs + drafts."""
        seq = self.prompt_token_ids + self.output_token_ids + self.spec_token_ids
        return seq[start:end]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def update_block_hashes(self, block_size: int, seed: int) -> list[BlockHash]:
        """Extend ``block_hashes`` to cover every full block of verified tokens."""
        n_full = self.num_tokens // block_size
        if len(self.block_hashes) < n_full:
            start = len(self.block_hashes)
            parent = self.block_hashes[-1] if start else root_hash(seed, self.tenant)
            self.block_hashes.extend(
                hash_blocks(
                    self.all_token_ids[: n_full * block_size],
                    block_size,
                    parent=parent,
                    start_block=start,
                )
            )
        return self.block_hashes

    @property
    def is_finished(self) -> bool:
        return self.status.finished
