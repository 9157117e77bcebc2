"""Per-request sampling parameters (vLLM-compatible names). Pure Python: imports no torch.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field, the
allowed range and the value given, so ingress can hand the message straight back to the client.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_REPETITION_PENALTY = 100.0
MAX_SEED = 2**63 - 1


def _is_int(value: object) -> bool:
    # bool is a subclass of int; a JSON `true` must not pass as a token count.
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return result


def _as_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    return int(value)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 disables top-k. ``logprobs=n`` asks for
    the sampled token's logprob and rank plus the ``n`` most likely tokens (0: sampled token only).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        temperature = _as_float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        put("temperature", temperature)

        top_p = _as_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        put("top_p", top_p)

        top_k = _as_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1; got {self.top_k!r}")
        put("top_k", top_k)

        min_p = _as_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1]; got {self.min_p!r}")
        put("min_p", min_p)

        rep = _as_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < rep <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]; "
                f"got {self.repetition_penalty!r}"
            )
        put("repetition_penalty", rep)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]; got {getattr(self, name)!r}")
            put(name, value)

        if self.seed is not None:
            seed = _as_int("seed", self.seed)
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63-1] or None; got {self.seed!r}")
            put("seed", seed)

        max_tokens = _as_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens!r}")
        put("max_tokens", max_tokens)

        min_tokens = _as_int("min_tokens", self.min_tokens)
        if not 0 <= min_tokens <= max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={max_tokens}]; got {self.min_tokens!r}"
            )
        put("min_tokens", min_tokens)

        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings; got {self.stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop entries must be non-empty strings; got {s!r}")
        put("stop", list(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers; got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids entries must be integers >= 0; got {t!r}")
        put("stop_token_ids", [int(t) for t in ids])

        if self.logprobs is not None:
            logprobs = _as_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}] or None; got {self.logprobs!r}"
                )
            put("logprobs", logprobs)

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(p.to_dict()) == p``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a wire dict; missing keys take defaults, unknown keys are rejected."""
        if not isinstance(data, dict):
            raise ValueError(f"SamplingParams.from_dict expects a dict; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown SamplingParams field(s): {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        return cls(**data)
