"""Wire <-> engine: gRPC messages to a validated ``GenerationJob``, engine deltas to messages.

Validation happens here, at the ingress, before any replica is touched; every failure is a
``RequestError`` of kind INVALID_ARGUMENT naming the field (``sampling.temperature``,
``prompt_token_ids``...) and the limit. The checks mirror ``Engine.validate`` (which the replica
still runs), with the model's limits passed in as plain values. No Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayfleet.cluster.errors import RequestError
from rayfleet.protos_gen.v1 import generation_pb2 as pb
from rayfleet.sampling_params import SamplingParams

# proto field -> SamplingParams field; every engine parameter has a proto field of the same name.
_SCALAR_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
_REPEATED_FIELDS = ("stop", "stop_token_ids")


@dataclass(frozen=True)
class ModelLimits:
    """What the ingress knows of the model to validate requests without a replica."""

    vocab_size: int
    max_model_len: int
    # Tokens one request may hold in a replica's KV pool (None = not known yet).
    kv_capacity_tokens: int | None = None


@dataclass
class GenerationJob:
    """A validated request as the replica receives it (pickled through the handle)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str | None = None
    session_id: str | None = None
    prompt_text: str | None = None  # kept for logs/echo only; the engine gets the ids
    # For the ingress's request router only (rayfleet.router.routing_state.RoutingHint): block
    # hashes, session key, mode. It never leaves the ingress process (dropped when pickled).
    routing: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["routing"] = None
        return state


@dataclass
class StreamChunk:
    """One step's delta of one request, replica -> ingress. The last chunk has finish_reason."""

    request_id: str
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    # (token_id, logprob, rank, [(id, logprob), ...]) per token of this delta, when asked.
    logprobs: list[tuple[int, float, int, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    replica_id: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _field_of(message: str) -> str:
    """SamplingParams errors start with the field name ("top_p must be in (0, 1]; ...")."""
    head = message.split(" ", 1)[0]
    return head if head in {f for f in _SCALAR_FIELDS + _REPEATED_FIELDS} else "sampling"


def sampling_from_dict(values: dict[str, Any], prefix: str = "sampling.") -> SamplingParams:
    """SamplingParams from set fields only (unset = engine default); bad values name the field."""
    try:
        return SamplingParams(**values)
    except ValueError as e:
        msg = str(e)
        raise RequestError.invalid(f"{prefix}{_field_of(msg)}", msg) from None


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    values: dict[str, Any] = {}
    for name in _SCALAR_FIELDS:
        if msg.HasField(name):
            values[name] = getattr(msg, name)
    for name in _REPEATED_FIELDS:
        items = list(getattr(msg, name))
        if items:
            values[name] = items
    return sampling_from_dict(values)


def check_limits(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    limits: ModelLimits,
    prompt_field: str,
    max_tokens_field: str = "sampling.max_tokens",
    stop_ids_field: str = "sampling.stop_token_ids",
) -> None:
    """Reject what no replica could serve (the checks of ``Engine.validate`` and the KV pool)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestError.invalid(prompt_field, "prompt must contain at least one token")
    vocab = limits.vocab_size
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError.invalid(prompt_field, f"token ids must be in [0, {vocab}); got {bad}")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError.invalid(stop_ids_field, f"token ids must be in [0, {vocab}); got {bad}")
    ctx = limits.max_model_len
    if n >= ctx:
        raise RequestError.invalid(
            prompt_field,
            f"prompt has {n} tokens; the model's context is {ctx} (prompt + max_tokens <= {ctx})",
        )
    if n + params.max_tokens > ctx:
        raise RequestError.invalid(
            max_tokens_field,
            f"max_tokens must be <= {ctx - n} for this {n}-token prompt: prompt + max_tokens = "
            f"{n + params.max_tokens} exceeds the model's context of {ctx}",
        )
    cap = limits.kv_capacity_tokens
    if cap is not None and n + params.max_tokens > cap:
        raise RequestError.invalid(
            max_tokens_field,
            f"prompt + max_tokens = {n + params.max_tokens} tokens exceeds a replica's KV cache "
            f"of {cap} tokens",
        )


def job_from_proto(
    req: pb.GenerateRequest,
    *,
    request_id: str,
    limits: ModelLimits,
    tokenize: Callable[[str], list[int]] | None,
) -> GenerationJob:
    """Validate a GenerateRequest into a job (``request_id`` already assigned)."""
    which = req.WhichOneof("prompt")
    text = None
    if which == "prompt_text":
        text = req.prompt_text
        if not text:
            raise RequestError.invalid("prompt_text", "must not be empty")
        if tokenize is None:
            raise RequestError.invalid(
                "prompt_text", "this model has no tokenizer; send prompt_token_ids"
            )
        ids = tokenize(text)
    elif which == "prompt_token_ids":
        ids = list(req.prompt_token_ids.ids)
    else:
        raise RequestError.invalid("prompt", "set prompt_text or prompt_token_ids")
    if req.output not in pb.OutputMode.values():
        raise RequestError.invalid("output", f"unknown OutputMode {req.output}")
    params = sampling_from_proto(req.sampling)
    check_limits(ids, params, limits, which)
    return GenerationJob(
        request_id=request_id,
        prompt_token_ids=ids,
        params=params,
        tenant=req.tenant or None,
        session_id=req.session_id or None,
        prompt_text=text,
    )


def chunk_to_proto(chunk: StreamChunk, output: int) -> pb.GenerateResponse:
    """One GenerateResponse per chunk; ``output`` is the request's OutputMode."""
    want_text = output != pb.OUTPUT_MODE_TOKEN_IDS
    want_ids = output != pb.OUTPUT_MODE_TEXT
    msg = pb.GenerateResponse(request_id=chunk.request_id)
    if want_text:
        msg.text = chunk.new_text
    if want_ids:
        msg.token_ids.extend(chunk.new_token_ids)
    for tid, lp, rank, top in chunk.logprobs or ():
        msg.logprobs.append(
            pb.TokenLogprob(
                token_id=tid,
                logprob=lp,
                rank=rank,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top],
            )
        )
    if chunk.finished:
        msg.finish_reason = chunk.finish_reason or ""
        msg.replica_id = chunk.replica_id
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=chunk.num_prompt_tokens,
                completion_tokens=chunk.num_output_tokens,
                cached_tokens=chunk.num_cached_tokens,
            )
        )
        if isinstance(chunk.stop_reason, str):
            msg.stop_string = chunk.stop_reason
        elif isinstance(chunk.stop_reason, int):
            msg.stop_token_id = chunk.stop_reason
    return msg
