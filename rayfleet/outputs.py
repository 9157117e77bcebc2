"""What the engine hands back per request. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
