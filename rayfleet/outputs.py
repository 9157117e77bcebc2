"""What the engine hands back per request. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    """Speculative decoding of one request so far.

    ``drafted_by_position[j]`` counts steps that verified a (j+1)-th draft and
    ``accepted_by_position[j]`` those where it was accepted (acceptance stops at the first
    rejection, so both fall with j).
    """

    num_steps: int = 0  # steps that verified at least one draft
    num_drafted: int = 0
    num_accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    def add(self, drafted: int, accepted: int) -> None:
        self.num_steps += 1
        self.num_drafted += drafted
        self.num_accepted += accepted
        grow = drafted - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position.extend([0] * grow)
            self.accepted_by_position.extend([0] * grow)
        for j in range(drafted):
            self.drafted_by_position[j] += 1
            if j < accepted:
                self.accepted_by_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying step: accepted drafts + the correction/bonus token."""
        return (self.num_accepted + self.num_steps) / self.num_steps if self.num_steps else 0.0

    def copy(self) -> SpecStats:
        return SpecStats(
            self.num_steps,
            self.num_drafted,
            self.num_accepted,
            list(self.drafted_by_position),
            list(self.accepted_by_position),
        )


@dataclass
class RequestOutput:
    """The state of one request after a step.

    Cumulative fields (``token_ids``, ``text``, ``logprobs``) hold everything generated so far;
    ``new_token_ids`` / ``new_text`` hold what this output adds to the previous one, for streaming.
    ``text`` never contains a stop string (unless include_stop_str_in_output) and, while the
    request runs, holds back characters that could still turn out to start one.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    num_cached_tokens: int
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    logprobs: list[Any] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    metrics: dict[str, float] = field(default_factory=dict)
    spec: SpecStats | None = None  # set when the engine runs a draft model

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
