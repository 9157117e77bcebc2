"""OpenAI-compatible HTTP: request bodies -> GenerationJob, StreamChunks -> response JSON.

Routes (served by the ingress through Serve's HTTP proxy): ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, each streaming (SSE, ``stream: true``)
or not. Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with 400
(the ``param`` names the field), 429 (queues full) or 503 (no replica). Pure Python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayfleet.cluster.errors import ErrorKind, RequestError
from rayfleet.cluster.request_codec import (
    GenerationJob,
    ModelLimits,
    StreamChunk,
    check_limits,
    sampling_from_dict,
)

# OpenAI body key -> engine SamplingParams field, shared by both endpoints. vLLM's extensions
# (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids...) are accepted too.
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
}
# Accepted but without effect here (OpenAI client bookkeeping).
_IGNORED_KEYS = {"user", "stream_options", "model", "stream", "metadata", "store", "service_tier"}


@dataclass
class OpenAIRequest:
    job: GenerationJob
    stream: bool
    include_usage: bool
    model: str
    want_logprobs: bool = False


@dataclass(frozen=True)
class ModelCard:
    """What the HTTP layer needs to know of the served model."""

    name: str
    limits: ModelLimits
    tokenize: Callable[[str], list[int]] | None
    apply_chat_template: Callable[[list[dict[str, Any]]], list[int]] | None
    created: int = 0


def error_body(err: RequestError) -> dict[str, Any]:
    param = err.field
    if param and param.startswith("sampling."):
        param = param.split(".", 1)[1]
    return {
        "error": {
            "message": err.details,
            "type": err.kind.openai_type,
            "param": param,
            "code": err.kind.http_status,
        }
    }


def models_body(card: ModelCard) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": card.name,
                "object": "model",
                "created": card.created,
                "owned_by": "rayfleet",
                "max_model_len": card.limits.max_model_len,
            }
        ],
    }


def _check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError.invalid("body", "request body must be a JSON object")
    return body


def _common(body: dict[str, Any], card: ModelCard) -> tuple[dict[str, Any], bool, bool]:
    model = body.get("model")
    if model is not None and model != card.name:
        raise RequestError.invalid(
            "model", f"model {model!r} is not served here; use {card.name!r}"
        )
    n = body.get("n", 1)
    if n != 1:
        raise RequestError.invalid("n", f"only n=1 is supported; got {n!r}")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise RequestError.invalid("best_of", f"only best_of=1 is supported; got {best_of!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError.invalid("stream", f"stream must be a boolean; got {stream!r}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError.invalid("stream_options", "stream_options must be an object")
    values = {
        engine_key: body[key]
        for key, engine_key in _SAMPLING_KEYS.items()
        if key in body and body[key] is not None
    }
    return values, stream, bool(opts.get("include_usage", False))


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...], default: int | None) -> int | None:
    for key in keys:
        if body.get(key) is not None:
            return body[key]
    return default


def completion_request(body: Any, card: ModelCard, request_id: str) -> OpenAIRequest:
    body = _check_body(body)
    values, stream, include_usage = _common(body, card)
    if body.get("echo"):
        raise RequestError.invalid("echo", "echo is not supported")
    if body.get("suffix"):
        raise RequestError.invalid("suffix", "suffix is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text = None
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError.invalid("prompt", "prompt must not be empty")
        if card.tokenize is None:
            raise RequestError.invalid("prompt", "this model has no tokenizer; send token ids")
        text = prompt
        ids = card.tokenize(prompt)
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        ids = list(prompt)
    else:
        raise RequestError.invalid(
            "prompt", "prompt must be a string, a list of token ids, or a list of one of them"
        )
    max_tokens = _max_tokens(body, ("max_tokens",), 16)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        values["logprobs"] = logprobs
    values["max_tokens"] = max_tokens
    params = sampling_from_dict(values, prefix="")
    check_limits(ids, params, card.limits, "prompt", "max_tokens", "stop_token_ids")
    job = GenerationJob(request_id, ids, params, prompt_text=text, tenant=_tenant(body))
    return OpenAIRequest(job, stream, include_usage, card.name, logprobs is not None)


def chat_request(body: Any, card: ModelCard, request_id: str) -> OpenAIRequest:
    body = _check_body(body)
    values, stream, include_usage = _common(body, card)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError.invalid("messages", "messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError.invalid(f"messages[{i}]", "each message needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text":
                    raise RequestError.invalid(
                        f"messages[{i}].content", "only text content parts are supported"
                    )
                parts.append(str(p.get("text", "")))
            messages[i] = {**m, "content": "".join(parts)}
        elif content is not None and not isinstance(content, str):
            raise RequestError.invalid(f"messages[{i}].content", "content must be a string")
    if body.get("tools"):
        raise RequestError.invalid("tools", "tool calling is not supported")
    if card.apply_chat_template is None:
        raise RequestError.invalid(
            "messages",
            "this model has no chat template; use /v1/completions with a plain prompt",
        )
    ids = card.apply_chat_template(messages)
    want_logprobs = bool(body.get("logprobs"))
    if want_logprobs:
        values["logprobs"] = body.get("top_logprobs") or 0
    room = card.limits.max_model_len
    if card.limits.kv_capacity_tokens is not None:
        room = min(room, card.limits.kv_capacity_tokens)
    # OpenAI's default for chat is "as much as fits" (context and one replica's KV cache).
    values["max_tokens"] = _max_tokens(
        body, ("max_completion_tokens", "max_tokens"), max(room - len(ids), 1)
    )
    params = sampling_from_dict(values, prefix="")
    check_limits(ids, params, card.limits, "messages", "max_tokens", "stop_token_ids")
    job = GenerationJob(request_id, ids, params, tenant=_tenant(body))
    return OpenAIRequest(job, stream, include_usage, card.name, want_logprobs)


def _tenant(body: dict[str, Any]) -> str | None:
    # vLLM-style cache salt: requests only share prefix-cache blocks within one salt.
    salt = body.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None


def _usage(final: StreamChunk | None) -> dict[str, Any] | None:
    if final is None:
        return None
    return {
        "prompt_tokens": final.num_prompt_tokens,
        "completion_tokens": final.num_output_tokens,
        "total_tokens": final.num_prompt_tokens + final.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens},
    }


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _completion_logprobs(chunks: list[StreamChunk], decode: Callable[[int], str]) -> Any:
    tokens, lps, tops = [], [], []
    for c in chunks:
        for tid, lp, _rank, top in c.logprobs or ():
            tokens.append(decode(tid))
            lps.append(lp)
            tops.append({decode(t): v for t, v in top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}


def _chat_logprobs(chunks: list[StreamChunk], decode: Callable[[int], str]) -> Any:
    content = []
    for c in chunks:
        for tid, lp, _rank, top in c.logprobs or ():
            content.append(
                {
                    "token": decode(tid),
                    "logprob": lp,
                    "bytes": None,
                    "top_logprobs": [
                        {"token": decode(t), "logprob": v, "bytes": None} for t, v in top
                    ],
                }
            )
    return {"content": content}


def completion_body(
    req: OpenAIRequest, chunks: list[StreamChunk], created: int, decode: Callable[[int], str]
) -> dict[str, Any]:
    final = chunks[-1] if chunks and chunks[-1].finished else None
    choice: dict[str, Any] = {
        "index": 0,
        "text": "".join(c.new_text for c in chunks),
        "finish_reason": _finish(final.finish_reason if final else None),
        "logprobs": _completion_logprobs(chunks, decode) if req.want_logprobs else None,
    }
    return {
        "id": f"cmpl-{req.job.request_id}",
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": [choice],
        "usage": _usage(final),
    }


def chat_body(
    req: OpenAIRequest, chunks: list[StreamChunk], created: int, decode: Callable[[int], str]
) -> dict[str, Any]:
    final = chunks[-1] if chunks and chunks[-1].finished else None
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(c.new_text for c in chunks)},
        "finish_reason": _finish(final.finish_reason if final else None),
        "logprobs": _chat_logprobs(chunks, decode) if req.want_logprobs else None,
    }
    return {
        "id": f"chatcmpl-{req.job.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [choice],
        "usage": _usage(final),
    }


def completion_chunk_body(
    req: OpenAIRequest, chunk: StreamChunk, created: int, decode: Callable[[int], str]
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{req.job.request_id}",
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "text": chunk.new_text,
                "finish_reason": _finish(chunk.finish_reason),
                "logprobs": _completion_logprobs([chunk], decode) if req.want_logprobs else None,
            }
        ],
    }


def chat_chunk_body(
    req: OpenAIRequest,
    chunk: StreamChunk,
    created: int,
    decode: Callable[[int], str],
    first: bool,
) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": chunk.new_text}
    if first:
        delta["role"] = "assistant"
    return {
        "id": f"chatcmpl-{req.job.request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": _finish(chunk.finish_reason),
                "logprobs": _chat_logprobs([chunk], decode) if req.want_logprobs else None,
            }
        ],
    }


def usage_chunk_body(req: OpenAIRequest, final: StreamChunk, created: int, chat: bool) -> dict:
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{req.job.request_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": _usage(final),
    }


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def now_s() -> int:
    return int(time.time())


__all__ = [
    "ErrorKind",
    "ModelCard",
    "OpenAIRequest",
    "chat_body",
    "chat_chunk_body",
    "chat_request",
    "completion_body",
    "completion_chunk_body",
    "completion_request",
    "error_body",
    "models_body",
    "sse",
    "usage_chunk_body",
]
